"""segserve's Gradio page: segment photos in the browser through the client library (`python -m gradio_ui`)."""
