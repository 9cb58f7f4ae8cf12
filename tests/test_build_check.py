"""`mmpt shards build` (manifest and folder layouts, every refusal reason) and `mmpt shards check`."""
import json
import subprocess
import sys
import tarfile

import pytest

from tests.media_files import make_audio, make_video, png_bytes, spoken


def mmpt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmpt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_build_from_manifest_all_modalities_and_refusals(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    (tmp_path / "c.jpeg").write_bytes(png_bytes(fmt="JPEG"))
    (tmp_path / "empty.png").write_bytes(b"")
    make_video(tmp_path / "v.mp4", audio=True)
    spoken(tmp_path / "s.wav")
    (tmp_path / "big.bmp").write_bytes(b"BM")
    rows = [{"image": "a.png", "text": "a grey square", "label": 2},
            {"image": "c.jpeg", "text": "a jpeg, stored under the standard key jpg"},
            {"video": "v.mp4", "text": "a test pattern", "label": 0, "source": "lavfi"},
            {"audio": "s.wav", "text": "someone saying seven", "label": 7},
            {"video": "v.mp4", "audio": "s.wav"},
            {"image": "b.jpg", "text": "broken"},
            {"image": "missing.png", "text": "gone"},
            {"image": "a.png", "text": "  "},
            {"image": "big.bmp", "text": "odd extension"},
            {"image": "empty.png", "text": "nothing"},
            {"image": "a.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = mmpt("shards", "build", "--manifest", manifest, "--out", tmp_path / "out", "--prefix", "m",
                "--shard-size", "2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["written"] == 5 and summary["shards"] == 3
    assert summary["refused"] == {"unreadable": 1, "missing_file": 1, "empty_text": 1, "unknown_extension": 1,
                                  "empty_file": 1, "fewer_than_two_modalities": 1}
    assert summary["keys"] == {"png": 1, "jpg": 1, "mp4": 2, "wav": 2, "txt": 4, "json": 5}
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"m-000000.tar": 2, "m-000001.tar": 2, "m-000002.tar": 1}
    for name in sizes:
        with tarfile.open(tmp_path / "out" / name) as tar:
            assert all(n.split(".", 1)[1] in ("png", "jpg", "mp4", "wav", "txt", "json") for n in tar.getnames())

    check = mmpt("shards", "check", tmp_path / "out", "--json")
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["samples"] == 5 and report["bad"] == 0
    # audio_track: a video whose sound track is the sample's audio (the video + wav row uses its wav, as training does)
    assert report["samples_per_modality"] == {"image": 2, "video": 2, "audio": 2, "text": 4, "audio_track": 1}
    assert report["stats"]["video_duration"]["max"] > 1.5
    assert report["stats"]["audio_sample_rate"]["counts"] == {"22050": 2}  # small integer stats are counted


def test_build_from_folder_with_labels(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / cls / f"{i}.png").write_bytes(png_bytes(value=value + i))
            (tmp_path / "src" / cls / f"{i}.txt").write_text(f"a photo of {cls} number {i}")
    (tmp_path / "src" / "dogs" / "3.flac").write_bytes(make_audio(tmp_path / "x.flac"))
    (tmp_path / "src" / "dogs" / "3.txt").write_text("a bark")
    proc = mmpt("shards", "build", "--folder", tmp_path / "src", "--labels-from-folders", "--out", tmp_path / "out",
                "--prefix", "pets", "--no-shuffle")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 7
    with tarfile.open(tmp_path / "out" / "pets-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [(m["class"], m["label"]) for m in metas] == [("cats", 0)] * 3 + [("dogs", 1)] * 4


def test_check_reports_bad_samples_by_shard_and_key_and_fails(tmp_path):
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "x-000000.tar")) as w:
        w.write({"__key__": "ok", "png": png_bytes(), "txt": "fine"})
        w.write({"__key__": "badimg", "png": b"xx", "txt": "broken"})
        w.write({"__key__": "nocap", "png": png_bytes()})
        w.write({"__key__": "badvid", "mp4": b"\x00\x00\x00\x18ftypmp42", "txt": "video"})
    (tmp_path / "s" / "sizes.json").write_text('{"x-000000.tar": 4}')
    proc = mmpt("shards", "check", tmp_path / "s", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["bad_by_reason"] == {"undecodable_image": 1, "fewer_than_two_modalities": 1, "undecodable_video": 1}
    assert {(b["key"], b["reason"]) for b in report["bad_samples"]} == {
        ("badimg", "undecodable_image"), ("nocap", "fewer_than_two_modalities"), ("badvid", "undecodable_video")}
    assert mmpt("shards", "check", tmp_path / "s", "--max-bad", "0.8").returncode == 0
    human = mmpt("shards", "check", tmp_path / "s").stdout
    assert "4 samples, 3 bad (75.00%)" in human and "x-000000.tar:badimg undecodable_image" in human


def test_build_needs_manifest_or_folder(tmp_path):
    proc = mmpt("shards", "build", "--out", tmp_path, "--prefix", "x")
    assert proc.returncode == 2 and "exactly one of --manifest or --folder" in proc.stderr
    proc = mmpt("shards", "build", "--manifest", tmp_path / "none.csv", "--out", tmp_path, "--prefix", "x")
    assert proc.returncode == 2 and "none.csv: no such file" in proc.stderr


def test_label_only_samples_build_and_check_for_imagefolder_eval_sets(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "src" / cls / f"{i}.png").write_bytes(png_bytes(value=value + i))  # no captions
    proc = mmpt("shards", "build", "--folder", tmp_path / "src", "--labels-from-folders", "--out", tmp_path / "out",
                "--prefix", "pets", "--no-shuffle")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 4
    check = mmpt("shards", "check", tmp_path / "out", "--json")
    assert check.returncode == 0, check.stdout
    report = json.loads(check.stdout)
    assert report["bad"] == 0 and report["samples_per_modality"] == {"image": 4}
    # Without a label one modality is still too few, in a manifest and in shards; a label must be an index.
    (tmp_path / "m.jsonl").write_text('{"image": "src/cats/0.png"}\n{"image": "src/cats/1.png", "label": "cat"}\n'
                                      '{"image": "src/dogs/0.png", "label": 1}\n')
    summary = json.loads(mmpt("shards", "build", "--manifest", tmp_path / "m.jsonl", "--out", tmp_path / "m",
                              "--prefix", "m").stdout)
    assert summary["written"] == 1 and summary["refused"] == {"fewer_than_two_modalities": 1, "bad_label": 1}
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "x-000000.tar")) as w:
        w.write({"__key__": "labelled", "png": png_bytes(), "json": {"label": 3}})
        w.write({"__key__": "bare", "png": png_bytes(), "json": {"source": "somewhere"}})
    (tmp_path / "s" / "sizes.json").write_text('{"x-000000.tar": 2}')
    report = json.loads(mmpt("shards", "check", tmp_path / "s", "--json").stdout)
    assert [(b["key"], b["reason"]) for b in report["bad_samples"]] == [("bare", "fewer_than_two_modalities")]


def test_unreadable_sidecar_json_is_refused_naming_the_file(tmp_path):
    from mmpt.data.build import build_shards, folder_rows

    for i in range(3):
        (tmp_path / "src" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.png").write_bytes(png_bytes(value=10 * i))
        (tmp_path / "src" / f"{i}.txt").write_text(f"square {i}")
    (tmp_path / "src" / "1.json").write_text('{"source": ')
    (tmp_path / "src" / "2.json").write_text('["not", "an", "object"]')
    summary = build_shards(folder_rows(tmp_path / "src", False), ".", tmp_path / "out", "f", shuffle_seed=None)
    assert summary["written"] == 1 and summary["refused"] == {"bad_json": 2}
    assert summary["refused_examples"]["bad_json"].startswith(f"{tmp_path / 'src' / '1.json'}: invalid JSON")


def test_check_counts_labels_that_are_no_index_and_warns_of_unlisted_shards(tmp_path):
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "x-000000.tar")) as w:
        w.write({"__key__": "named", "png": png_bytes(), "txt": "a cat", "json": {"label": "cat"}})
        w.write({"__key__": "blank", "png": png_bytes(), "txt": "a dog", "json": {"label": ""}})  # no label
    (tmp_path / "s" / "sizes.json").write_text('{"x-000000.tar": 2}')
    for i in range(7):  # copied in by hand, never listed: no reader would see them
        (tmp_path / "s" / f"y-{i:06d}.tar").write_bytes((tmp_path / "s" / "x-000000.tar").read_bytes())
    proc = mmpt("shards", "check", tmp_path / "s", "--json", "--max-bad", "0.5")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["samples"] == 2 and report["bad_by_reason"] == {"bad_label": 1}
    assert report["unlisted_shards"] == [f"y-{i:06d}.tar" for i in range(7)]
    assert proc.stderr.splitlines() == [
        f"shard dir {tmp_path / 's'}: 7 .tar file(s) not listed in its sizes.json are ignored: y-000000.tar, "
        "y-000001.tar, y-000002.tar, y-000003.tar, y-000004.tar, ... (2 more) (add them to sizes.json, or rebuild "
        "with `mmpt shards build`)"]


def palette_png_with_transparency(path) -> None:
    """A real palette PNG whose tRNS chunk holds per-entry alpha bytes: PIL warns when converting it to RGB."""
    from PIL import Image

    img = Image.new("P", (32, 32))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.putdata([x % 4 for x in range(32 * 32)])
    img.save(path, transparency=bytes([0, 128, 255, 255]))


def test_library_warnings_are_counted_in_the_reports_not_printed(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        palette_png_with_transparency(tmp_path / "src" / f"{i}.png")
        (tmp_path / "src" / f"{i}.txt").write_text(f"pattern {i}")
    message = "UserWarning: Palette images with Transparency expressed in bytes should be converted to RGBA images"
    for workers in (1, 2):  # in this process and in pool workers
        out = tmp_path / f"out{workers}"
        proc = mmpt("shards", "build", "--folder", tmp_path / "src", "--out", out, "--prefix", "p", "--workers",
                    workers, "--no-shuffle")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines() == [  # no PIL lines: one of mmpt's own says where they went
            "shards build: 3 library warnings from 3 files, see library_warnings in the report",
            f"wrote 3 samples in 1 shards to {out}; refused 0 "]
        summary = json.loads(proc.stdout)  # nothing but the report on stdout
        assert summary["written"] == 3
        assert summary["library_warnings"] == {"count": 3, "files": 3, "by_message": {message: 3},
                                               "examples": {message: str(tmp_path / "src" / "0.png")}}
    proc = mmpt("shards", "check", tmp_path / "out1")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "library warnings: 3 from 3 samples (not failures)" in proc.stdout
    assert f"  {message} x3 (first: {tmp_path / 'out1' / 'p-000000.tar'}:000000000)" in proc.stdout
    assert "warnings.warn" not in proc.stdout


@pytest.mark.parametrize("folders, expected", [
    (["apple", "banana", "cherry"], {"apple": 0, "cherry": 2}),  # banana is empty: cherry stays class 2
    (["0", "1", "2", "3"], {"0": 0, "3": 3}),  # numbered folders keep their number, 1 and 2 empty
])
def test_labels_from_folders_count_empty_class_folders(tmp_path, folders, expected):
    from mmpt.data.build import folder_rows

    for name in folders:
        (tmp_path / "src" / name).mkdir(parents=True)
    for name in expected:
        (tmp_path / "src" / name / "a.png").write_bytes(png_bytes())
    rows = folder_rows(tmp_path / "src", labels_from_folders=True)
    assert {row["class"]: row["label"] for row in rows} == expected
