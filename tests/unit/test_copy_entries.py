"""`oci copy` in process: FinalizeImage builds the image from the entries PutLayer parsed
while it wrote each layer, reading no layer stream back, and the image is the source's."""

from __future__ import annotations

import json

from pycfs.host.oci import image as image_module
from pycfs.tools.cli import main

import imagebuild


def test_copy_builds_the_image_without_reading_layers_back(tmp_path, capsys, monkeypatch) -> None:
    built = imagebuild.build_layout(imagebuild.multilayer_image(), tmp_path / "layout")
    src, dest = tmp_path / "src", tmp_path / "dest"
    for repo in (src, dest):
        assert main(["--repo", str(repo), "init"]) == 0
    assert main(["--repo", str(src), "oci", "pull", f"oci:{built.path}", "img"]) == 0
    read_back = []
    real_iter = image_module.iter_layer_entries
    monkeypatch.setattr(image_module, "iter_layer_entries", lambda reader: read_back.append(reader) or real_iter(reader))
    capsys.readouterr()
    assert main(["--repo", str(dest), "oci", "copy", "img", "--from", str(src), "--name", "img", "--json"]) == 0
    assert read_back == []

    def images(repo) -> dict:
        capsys.readouterr()
        assert main(["--repo", str(repo), "oci", "inspect", "img"]) == 0
        return json.loads(capsys.readouterr().out)["images"]

    assert images(dest) == images(src) and images(src)
