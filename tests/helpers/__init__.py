"""Code the tests share: servers and processes, images, the gate, certificates, the browser page, the
known-answer model and the other helper scripts. No fixtures here (each folder's conftest.py has those), and no
test module imports another test module."""
