"""The Gradio page in a real browser (Debian's Chromium with Playwright)."""
