"""aria_jax.files: outputs that never overlap their inputs, staged replacement, leftovers of killed runs, JSON and
hub failures as one line."""

import json
import os
import subprocess
import sys

import pytest

from aria_jax.errors import InputError
from aria_jax.files import (
    ModelNotFoundError,
    clean_stale,
    parse_json,
    read_json,
    refuse_overlap,
    resolve_model,
    staged_directory,
    staging_path,
    write_atomic,
)


def _tree(root) -> dict[str, str]:
    """Every file below ``root`` with its content (a snapshot to compare before and after)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path).read()
    return out


@pytest.fixture
def src(tmp_path):
    directory = tmp_path / "work" / "model"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "weights.bin").write_text("precious")
    return directory


@pytest.mark.parametrize(
    "dst, why",
    [
        (lambda s: s, "is the source"),
        (lambda s: s.parent, "contains the source"),
        (lambda s: s.parent.parent, "contains the source"),
        (lambda s: s / "out", "lies inside the source"),
        (lambda s: s / ".." / "model", "is the source"),  # relative components resolved
    ],
)
def test_output_overlapping_the_source_is_refused_before_anything_is_touched(src, dst, why):
    before = _tree(src.parent.parent)
    target = dst(src)
    with pytest.raises(InputError, match=why):
        with staged_directory(target, overwrite=True, sources=[src]):
            raise AssertionError("the block must not run")
    assert _tree(src.parent.parent) == before


def test_symlinks_are_resolved(src, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(src)
    with pytest.raises(InputError, match="is the source"):
        refuse_overlap(src, link)
    with pytest.raises(InputError, match="is the source"):
        refuse_overlap(link, src)
    (tmp_path / "parent_link").symlink_to(src.parent)
    with pytest.raises(InputError, match="contains the source"):
        refuse_overlap(src, tmp_path / "parent_link")


def test_the_working_directory_is_never_replaced(src, tmp_path, monkeypatch):
    here = tmp_path / "home" / "project"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    with pytest.raises(InputError, match="contains the working directory"):
        refuse_overlap(src, ".")
    with pytest.raises(InputError, match="contains the working directory"):
        refuse_overlap(src, tmp_path / "home")
    refuse_overlap(src, here / "new")  # one that does not exist yet is fine


def test_overwrite_replaces_only_after_the_block_completes(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with staged_directory(dst, overwrite=True) as tmp:
        assert (dst / "old.txt").read_text() == "old"  # still there while the new output is written
        (open(os.path.join(tmp, "new.txt"), "w")).write("new")
    assert sorted(os.listdir(dst)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    with pytest.raises(RuntimeError):
        with staged_directory(dst, overwrite=True) as tmp:
            raise RuntimeError("failed half-way")
    assert sorted(os.listdir(dst)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["dst"]


def test_overwrite_of_a_symlink_replaces_the_link_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "dst"
    link.symlink_to(target)
    with staged_directory(link, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert not link.is_symlink() and sorted(os.listdir(link)) == ["new.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["dst", "target"]  # no .dst.old-* left behind


def test_a_failed_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    real_rename = os.rename

    def rename(a, b):
        if ".partial-" in str(a):
            raise OSError(13, "Permission denied")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(InputError, match=rf"^{dst}: cannot move the new output into place \(Permission denied\)$"):
        with staged_directory(dst, overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(dst) == ["old.txt"] and os.listdir(tmp_path) == ["dst"]


def test_replacing_a_directory_never_follows_the_links_inside_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "link_to_dir").symlink_to(outside)
    (dst / "link_to_file").symlink_to(outside / "keep.txt")
    with staged_directory(dst, overwrite=True):
        pass
    assert os.listdir(dst) == [] and (outside / "keep.txt").read_text() == "mine"


def test_an_oserror_while_writing_names_the_destination(tmp_path):
    dst = tmp_path / "sub" / "dst"
    with pytest.raises(InputError, match=rf"^{dst}: cannot write \(No space left on device\)$"):
        with staged_directory(dst, overwrite=False):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # the parent it created is gone too


def test_destination_below_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        with staged_directory(tmp_path / "file" / "dst", overwrite=False):
            pass


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_of_dead_processes_is_cleaned_and_live_ones_kept(tmp_path):
    dst = str(tmp_path / "dst")
    dead = _dead_pid()
    stale = staging_path(dst, "partial").replace(f"-{os.getpid()}", f"-{dead}")
    legacy = os.path.join(tmp_path, f".dst.partial-{dead}")  # named by older versions, without the host
    live = staging_path(dst, "partial")  # this process: alive
    other_host = os.path.join(tmp_path, f".dst.partial-otherhost-{dead}")
    for path in (stale, legacy, live, other_host):
        os.makedirs(os.path.join(path, "params"))
    notes = clean_stale(dst)
    assert len(notes) == 2 and all("left by a killed run" in n for n in notes)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (live, other_host))


def test_a_run_killed_between_its_two_renames_gets_the_old_output_back(tmp_path):
    dst = str(tmp_path / "dst")
    old = staging_path(dst, "old").replace(f"-{os.getpid()}", f"-{_dead_pid()}")
    os.makedirs(old)
    open(os.path.join(old, "weights"), "w").write("previous")
    with pytest.raises(FileExistsError, match="already exists"):
        with staged_directory(dst, overwrite=False):
            pass
    assert open(os.path.join(dst, "weights")).read() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_atomic(path, "first")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        write_atomic(path, "second")
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"[" * 100_000, "nested too deeply"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"1" * 5000, "4300 digits"),
        (b"{'a': 1}", "Expecting property name"),
    ],
    ids=["deep", "utf16", "huge_int", "single_quotes"],
)
def test_malformed_json_is_one_error_naming_the_file(tmp_path, raw, why):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(InputError, match=why) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}: not valid JSON")
    with pytest.raises(InputError, match=why):
        parse_json(raw, "x")
    assert json.loads(b"1e999") == float("inf")  # accepted by json: callers check their own values


@pytest.mark.parametrize(
    "error, reason",
    [
        ("RepositoryNotFoundError", "no such repository, or a private one"),
        ("GatedRepoError", "a gated repository"),
        ("LocalEntryNotFoundError", "not in the local cache"),
        ("RevisionNotFoundError", "no revision 'v9'"),
    ],
)
def test_hub_failures_are_one_line_naming_the_id(monkeypatch, error, reason):
    import huggingface_hub
    from huggingface_hub import errors

    cls = getattr(errors, error)

    def fail(repo_id, revision=None, allow_patterns=None):
        exc = cls.__new__(cls)
        Exception.__init__(exc, "long\nmultiline message")
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("rhymes-ai/Aria", revision="v9")
    assert str(info.value).startswith(f"rhymes-ai/Aria: cannot fetch from the hub ({error}: {reason}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", ["no/such/dir", "../x", "a/b/c", "/abs/path", "x" * 3, "-bad/id"])
def test_non_directories_that_are_not_hub_ids_fail_without_the_hub(path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model(path)


def test_write_atomic_keeps_the_mode_of_what_it_replaces(tmp_path):
    previous = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.yaml", "x")  # as open(path, "w") would make it: 0666 less the umask
    finally:
        os.umask(previous)
    assert (tmp_path / "new.yaml").stat().st_mode & 0o777 == 0o640
    old = tmp_path / "old.yaml"
    old.write_text("x")
    os.chmod(old, 0o640)
    write_atomic(old, "y")
    assert old.stat().st_mode & 0o777 == 0o640 and old.read_text() == "y"
