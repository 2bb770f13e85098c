"""teacher_infer.imaging (decode, dali) on single images: every mode becomes RGB the same way in
both decoders, headers give the oriented size, bad files become reasons, not exceptions."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from teacher_infer import ImageSource
from teacher_infer.imaging import (DecodeError, ViewDataset, ViewSpec, collate, open_rgb,
                                   pixels_to_input)
from teacher_infer.imaging.dali import DaliDecoder
from teacher_infer.imaging.decode import header_size, to_rgb

SPEC = ViewSpec(views=3, input_size=(32, 32), crop_pct=0.875, seed=1)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_every_mode_becomes_rgb_with_the_oriented_size(mode_images):
    for key in mode_images.keys:
        image = open_rgb(mode_images.path(key))
        assert image.mode == "RGB", key
        assert (image.height, image.width) == mode_images.extra["expected_size"][key], key
        data = mode_images.path(key).read_bytes()
        assert header_size(data)[:2] == mode_images.extra["expected_size"][key], key


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 128, 257, 32896, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 128, 255]  # round(v * 255 / 65535)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_exif_orientation_is_applied(mode_images):
    upright = np.asarray(open_rgb(mode_images.path("rgb.jpg")), dtype=np.int16)
    rotated = np.asarray(open_rgb(mode_images.path("exif_rot180.jpg")), dtype=np.int16)
    # the same picture content stored upside down, turned back by EXIF (JPEG noise aside)
    raw = np.asarray(Image.open(mode_images.path("exif_rot180.jpg")).convert("RGB"), np.int16)
    np.testing.assert_array_equal(rotated, raw[::-1, ::-1])
    assert upright.shape == rotated.shape


@pytest.mark.parametrize("data,match", [
    (b"", "empty file"),
    (b"plain text, not a picture", "not an image"),
])
def test_header_errors(data, match):
    with pytest.raises(DecodeError, match=match):
        header_size(data)


def test_bad_files_become_invalid_items(broken_images):
    for mode in ("pil", "bytes"):
        dataset = ViewDataset(ImageSource(broken_images.root), broken_images.keys, SPEC,
                              "bilinear", mode=mode)
        batch = collate([dataset[i] for i in range(len(dataset))])
        bad = {broken_images.keys[i]: batch.reasons[i] for i in np.flatnonzero(~batch.valid)}
        expected_bad = set(broken_images.extra["bad"]) - ({"truncated.jpg"} if mode == "bytes"
                                                          else set())
        # the header of a truncated JPEG is fine: DALI itself finds it (see the DALI test)
        assert set(bad) == expected_bad, mode
        assert bad["missing.jpg"] == "missing file"
        assert all(reason for reason in bad.values())
        if mode == "pil":
            assert "truncated" in bad["truncated.jpg"]
        assert batch.boxes[~batch.valid].sum() == 0


def _dali(views_spec=SPEC):
    return DaliDecoder(spec=views_spec, interpolation="bicubic", mean=MEAN, std=STD, max_batch=8,
                       device=torch.device("cpu"), num_threads=2)


def test_dali_and_pil_decode_every_mode_alike(mode_images):
    """Same boxes, same RGB conversion: pixels agree to the rounding of the resampling."""
    keys = mode_images.keys
    images = ImageSource(mode_images.root)
    pil = collate([ViewDataset(images, keys, SPEC, "bicubic", mode="pil")[i]
                   for i in range(len(keys))])
    raw = collate([ViewDataset(images, keys, SPEC, "bicubic", mode="bytes")[i]
                   for i in range(len(keys))])
    assert pil.valid.all() and raw.valid.all()
    np.testing.assert_array_equal(pil.boxes, raw.boxes)
    np.testing.assert_array_equal(pil.flips, raw.flips)
    decoded = _dali().decode_batch(raw)
    expected = pixels_to_input(pil.pixels, torch.tensor(MEAN), torch.tensor(STD))
    grey_levels = ((decoded - expected) * torch.tensor(STD)[:, None, None] * 255).abs()
    for i, key in enumerate(keys):
        # 16-bit RGB: PIL keeps the high byte, DALI rounds (one level apart)
        assert grey_levels[:, i].max() <= 2.01, key
        assert grey_levels[:, i].mean() < 0.1, key
    assert raw.rendered[keys.index("x.gif")]  # a format DALI lacks is rendered by PIL


def test_dali_survives_a_corrupt_file_in_the_batch(broken_images):
    keys = broken_images.keys
    source = ImageSource(broken_images.root)
    dataset = ViewDataset(source, keys, SPEC, "bicubic", mode="bytes")
    batch = collate([dataset[i] for i in range(len(keys))])
    decoder = _dali()
    images = decoder.decode_batch(batch)
    bad = {keys[i]: batch.reasons[i] for i in np.flatnonzero(~batch.valid)}
    assert set(bad) == set(broken_images.extra["bad"])
    assert "truncated" in bad["truncated.jpg"] and "DALI" in bad["truncated.jpg"]
    assert decoder.rebuilds >= 1
    # every good image got the same pixels as when decoded in a batch without bad files
    good = [i for i, key in enumerate(keys) if key.startswith("good")]
    clean_set = ViewDataset(source, [keys[i] for i in good], SPEC, "bicubic", mode="bytes")
    clean_images = _dali().decode_batch(collate([clean_set[i] for i in range(len(good))]))
    torch.testing.assert_close(images[:, good], clean_images, rtol=0, atol=0)
    assert images[:, ~torch.from_numpy(batch.valid)].abs().sum() == 0


def test_dali_decode_stream_keeps_order(image_folder):
    keys = image_folder.keys
    dataset = ViewDataset(ImageSource(image_folder.root), keys, SPEC, "bicubic", mode="bytes")
    batches = [collate([dataset[i] for i in range(lo, min(lo + 5, len(keys)))])
               for lo in range(0, len(keys), 5)]
    decoder = _dali()
    streamed = list(decoder.decode(iter(batches)))
    assert [b.start for b, _ in streamed] == [0, 5, 10]
    for batch, images in streamed:
        torch.testing.assert_close(images, _dali().decode_batch(batch), rtol=0, atol=0)


def test_open_rgb_reasons(tmp_path):
    with pytest.raises(DecodeError, match="missing file"):
        open_rgb(tmp_path / "absent.jpg")
    with pytest.raises(DecodeError, match="not an image"):
        open_rgb(io.BytesIO(b"GIF89a but not really"))


def test_dali_output_copies_wait_for_the_current_stream(image_folder, monkeypatch):
    """On a GPU the output copies run on the decoder's own stream into freshly allocated
    memory that the current stream (the model) may still be reading: the copy stream must
    wait for the current stream first and be synchronised before DALI reuses its buffers.
    Checked on the CPU with a stand-in stream that records the order of events."""
    import nvidia.dali.plugin.pytorch as dali_torch

    events = []

    class RecordingStream:
        def wait_stream(self, stream):
            events.append(("wait", stream))

        def synchronize(self):
            events.append(("synchronize", None))

    copy = dali_torch.feed_ndarray

    def recorded_copy(output, tensor, cuda_stream=None):
        events.append(("copy", cuda_stream))
        return copy(output, tensor)

    keys = image_folder.keys[:4]
    dataset = ViewDataset(ImageSource(image_folder.root), keys, SPEC, "bicubic", mode="bytes")
    batch = collate([dataset[i] for i in range(len(keys))])
    decoder = _dali()
    expected = decoder.decode_batch(batch)
    stream = RecordingStream()
    decoder._stream = stream
    monkeypatch.setattr(dali_torch, "feed_ndarray", recorded_copy)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "current")
    torch.testing.assert_close(decoder.decode_batch(batch), expected, rtol=0, atol=0)
    assert events == ([("wait", "current")] + [("copy", stream)] * SPEC.views
                      + [("synchronize", None)])


# -- --decoder auto: one rule over the registry entries' own properties -----------------------

def _decoder(name: str, preferred_on: tuple[str, ...], why: str | None = None) -> type:
    return type(name, (), {"name": name, "preferred_on": preferred_on,
                           "unavailable": staticmethod(lambda: why)})


def test_auto_picks_by_the_decoders_properties_not_their_names(monkeypatch):
    """auto = the first registered decoder preferred on the device's type that can run here;
    else the first that can run here. A newly registered decoder takes part like the others."""
    from teacher_infer.imaging import decoders

    cpu, cuda = torch.device("cpu"), SimpleNamespace(type="cuda")
    assert decoders.resolve_decoder("auto", cpu).name == "pil"        # the registry as shipped
    if decoders.decoder_class("dali").unavailable() is None:
        assert decoders.resolve_decoder("auto", cuda).name == "dali"
    classes = {"first": _decoder("first", ("cuda",), why="not installed here"),
               "second": _decoder("second", ("cpu", "cuda")),
               "third": _decoder("third", ())}
    monkeypatch.setattr(decoders, "_WHERE", {name: ("decode", name) for name in classes})
    monkeypatch.setattr(decoders, "decoder_class", lambda name: classes[name])
    assert decoders.resolve_decoder("auto", cuda).name == "second"    # first cannot run
    assert decoders.resolve_decoder("auto", cpu).name == "second"
    classes["second"] = _decoder("second", ("cuda",))
    assert decoders.resolve_decoder("auto", cpu).name == "second"     # none preferred: the
    classes["second"] = _decoder("second", (), why="gone")            # first that can run
    assert decoders.resolve_decoder("auto", cpu).name == "third"
    with pytest.raises(ImportError, match="--decoder first: not installed here"):
        decoders.resolve_decoder("first", cpu)


def test_the_teacher_pass_decodes_with_pil_on_the_cpu_by_default(image_folder, tmp_path):
    """The teacher pass takes the one rule (resolve_decoder has no per-command switch): on the
    CPU auto is PIL, as in training, not DALI's CPU mode as before; the store records it."""
    import labelstore
    from teacher_infer import InferConfig, run

    from conftest import TINY_MODEL

    summary = run(InferConfig(model=TINY_MODEL, random_weights=True, data=str(image_folder.data),
                              out=str(tmp_path / "s.zarr"), input_size=32, num_workers=0,
                              progress=False, device="cpu", threads=1))
    assert summary.decoder == "pil"
    assert labelstore.open(summary.out).attrs["compute"]["decoder"] == "pil"
