"""The project layout never shadows the standard library's `platform` module."""

import importlib
import pathlib
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_platform_folder_is_a_source_root_not_a_package():
    assert (ROOT / "platform" / "spectune").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_is_the_standard_library():
    platform = importlib.import_module("platform")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert pathlib.Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.machine)
    import uuid  # uuid imports platform; it broke when the folder shadowed it

    assert uuid.uuid4()


def test_spectune_imports_from_platform_source_root():
    import spectune

    assert pathlib.Path(spectune.__file__).resolve().parent == ROOT / "platform" / "spectune"
