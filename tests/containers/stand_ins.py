"""What the container tests use in place of what this machine cannot reach: Docker Hub and torch's index.

- The base image: `python:3.11-slim-bookworm` cannot be pulled (no registry). A stand-in is built from
  Debian's own bookworm with debootstrap (the mirror apt already uses), with Python 3.11, pip, this
  machine's CA bundle and pip settings, then `docker import`ed; it is reused while the engine keeps it.
- torch's wheel index: the local wheel folders of pip's configuration (file:// indexes and find-links)
  served over loopback HTTP as one PEP 503 index, which the build reaches through host networking.
"""

from __future__ import annotations

import functools
import html
import http.server
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BASE_IMAGE = "segserve-test-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "passwd", "ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def run(argv: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload,no-any-return]


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], timeout=60).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), so debootstrap goes where apt goes."""
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE):
            uri = match.group(1) or match.group(2)
            if "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def host_pip_settings() -> str:
    """pip.conf for the image: this machine's settings that work anywhere (CA bundle, timeout), not its paths.

    PyPI stays an extra index: a build that passes --index-url (TORCH_INDEX_URL, the local wheels here)
    still finds there what the local folders lack (torch's CUDA packages cuda-bindings, cuda-toolkit).
    Files of the same name and version come from the first index, the local one."""
    lines = [
        "[global]",
        "cert = /etc/ssl/certs/ca-certificates.crt",
        "disable-pip-version-check = true",
        "extra-index-url = https://pypi.org/simple",
    ]
    listed = run(["pip", "config", "list"], timeout=60).stdout if shutil.which("pip") else ""
    if match := re.search(r"default-timeout='(\d+)'", listed):
        lines.append(f"timeout = {match.group(1)}")
    return "\n".join(lines) + "\n"


def unmount_below(root: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in reversed(mounts):
        if point == str(root) or point.startswith(f"{root}/"):
            run(["umount", "--lazy", point], timeout=60)


def build_base_image(tag: str = BASE_IMAGE) -> None:
    """debootstrap a minimal bookworm with Python and import it as `tag` (a couple of minutes)."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="segserve-base-", dir="/var/tmp") as work:
        root = Path(work) / "rootfs"
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(DEBIAN_PACKAGES)}",
            DEBIAN_SUITE,
            str(root),
            debian_mirror(),
        ]
        try:
            done = run(argv, timeout=1200)
        finally:
            unmount_below(root)  # debootstrap mounts /proc and /sys in the tree; never delete through them
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        # python and pip where the official image has them; pip may install system-wide, as in that image.
        (root / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        (root / "usr/local/bin/pip").symlink_to("/usr/bin/pip3")
        for marker in (root / "usr/lib").glob("python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        if CA_BUNDLE.is_file():  # this machine's trust store, so pip reaches the registry as it does here
            shutil.copyfile(CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "etc/pip.conf").write_text(host_pip_settings())
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [
                "docker",
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                'CMD ["python3"]',
                "-",
                tag,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr}")


def ensure_base_image(tag: str = BASE_IMAGE) -> str:
    if not image_exists(tag):
        build_base_image(tag)
    return tag


# ---- the wheel index ----------------------------------------------------------------------------------


def local_wheel_sources() -> tuple[list[Path], list[Path]]:
    """pip's file:// indexes and find-links folders on this machine, from `pip config list`."""
    listed = run(["pip", "config", "list"], timeout=60).stdout if shutil.which("pip") else ""
    indexes: list[Path] = []
    links: list[Path] = []
    for key, value in re.findall(r"^\S*?\.?([\w-]+)='([^']*)'", listed, re.MULTILINE):
        for item in value.split():
            path = Path(urllib.parse.urlparse(item).path) if item.startswith("file://") else Path(item)
            if key in ("index-url", "extra-index-url") and path.is_dir() and path not in indexes:
                indexes.append(path)
            elif key == "find-links" and path.is_dir() and path not in links:
                links.append(path)
    return indexes, links


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _IndexHandler(http.server.SimpleHTTPRequestHandler):
    """/simple/<project>/: every local index's links for it, plus matching files of the find-links folders.

    Files are served from /files/<n>/<path>, n being the source folder's position."""

    roots: list[Path] = []
    indexes: list[Path] = []
    links: list[Path] = []

    def log_message(self, format: str, *args: object) -> None:  # quiet: pip fetches many pages
        pass

    def do_GET(self) -> None:
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].split("/") if p]
        if len(parts) == 2 and parts[0] == "simple":
            self._project_page(_normalise(parts[1]))
        elif len(parts) >= 3 and parts[0] == "files" and parts[1].isdigit() and int(parts[1]) < len(self.roots):
            root = self.roots[int(parts[1])]
            path = (root / "/".join(parts[2:])).resolve()
            if path.is_file() and path.is_relative_to(root.resolve()):
                self._send_file(path)
                return
            self.send_error(404)
        else:
            self.send_error(404)

    def _project_page(self, project: str) -> None:
        anchors: list[str] = []
        for index in self.indexes:
            page = index / project / "index.html"
            if not page.is_file():
                continue
            number = self.roots.index(index.parent)
            for href, text in re.findall(r'<a[^>]*href="([^"]+)"[^>]*>([^<]*)</a>', page.read_text()):
                target = (page.parent / urllib.parse.unquote(href.split("#")[0])).resolve()
                fragment = "#" + href.split("#", 1)[1] if "#" in href else ""
                relative = target.relative_to(index.parent.resolve())
                anchors.append(f'<a href="/files/{number}/{urllib.parse.quote(str(relative))}{fragment}">{text}</a>')
        for folder in self.links:
            number = self.roots.index(folder)
            for wheel in sorted(folder.iterdir()):
                if _normalise(wheel.name.split("-")[0]) == project:
                    anchors.append(
                        f'<a href="/files/{number}/{urllib.parse.quote(wheel.name)}">{html.escape(wheel.name)}</a>'
                    )
        if not anchors:
            self.send_error(404)
            return
        body = ("<!DOCTYPE html><html><body>\n" + "\n".join(anchors) + "\n</body></html>\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as source:
            shutil.copyfileobj(source, self.wfile, 1 << 20)


# The index's URL is a build argument of the torch layer: the same port every run keeps that layer cached.
WHEEL_INDEX_PORT = 38419


@contextmanager
def wheel_index() -> Iterator[str]:
    """Serves this machine's local wheels on 127.0.0.1 as one simple index; yields its URL."""
    indexes, links = local_wheel_sources()
    roots = list(dict.fromkeys([i.parent for i in indexes] + links))
    handler = type("Handler", (_IndexHandler,), {"roots": roots, "indexes": indexes, "links": links})
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_INDEX_PORT), functools.partial(handler))
    except OSError:  # taken (another run at the same time): any port, at the price of rebuilding that layer
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="wheel-index")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()
