"""The Gradio page in a real browser (Debian's Chromium with Playwright).

Fixtures only; what they are built from lives in tests/helpers/."""
