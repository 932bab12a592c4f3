"""nnpartials verify BUNDLE --key PUB"""

from __future__ import annotations

NAME = "verify"
HELP = "verify a signed bundle: its signature (model.sig) with a public key, every sha256, both graphs"
DESCRIPTION = """\
Verify a bundle signed with `nnpartials export --sign KEY` against the signer's public key:

  * model.sig is a valid signature by the private key of --key (a PEM elliptic-curve public key),
  * it covers manifest.json and every file the manifest lists, as they are now,
  * every file has the sha256 and size the manifest lists, and both ONNX graphs pass the loader's checks.

An unsigned bundle, a signature made with another key, or any file changed since signing fails.
The same check runs when a key is given to the Python API: Partials(bundle, key=PUB), Kernel(bundle, key=PUB).
Needs the model-signing library: pip install 'nnpartials[sign]'.

Exit status: 0 when the bundle verifies, 1 otherwise (or on an error).
"""


def add_arguments(p):
    p.add_argument("bundle", help="bundle folder written by `nnpartials export --sign KEY`")
    p.add_argument("--key", required=True, metavar="PUB", help="the signer's public key (PEM, elliptic curve)")


def run(args) -> int:
    from rich.console import Console

    from nnpartials.bundle import MANIFEST, SIGNATURE
    from nnpartials.bundle import verify_bundle

    b = verify_bundle(args.bundle, args.key)
    Console(highlight=False).print(
        f"[bold green]verified[/] {b.path}: {SIGNATURE} is a valid signature by {args.key} over {MANIFEST} and "
        f"{len(b.files)} files ({', '.join(sorted(b.files))})")
    return 0
