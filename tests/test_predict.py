"""`slimseg predict`: label PNGs, overlays, mattes, background replacement, lists, video."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import yaml
from PIL import Image

from slimseg.cli import main
from slimseg.errors import ConfigError, DataError, MissingDependencyError, SlimsegError
from slimseg.evaluate import evaluate
from slimseg.predict import collect_inputs, color_map, predict, score_outputs
from helpers import channel_vote_model, write_vote_dataset

PRE = [{"type": "Resize", "target_size": [16, 16]}, {"type": "Normalize"}]


def paddleseg_color_map(num_classes):
    """PaddleSeg's get_color_map_list, verbatim in spirit: the reference for the palette."""
    num_classes += 1
    cmap = num_classes * [0, 0, 0]
    for i in range(num_classes):
        j, lab = 0, i
        while lab:
            cmap[i * 3] |= ((lab >> 0) & 1) << (7 - j)
            cmap[i * 3 + 1] |= ((lab >> 1) & 1) << (7 - j)
            cmap[i * 3 + 2] |= ((lab >> 2) & 1) << (7 - j)
            j += 1
            lab >>= 3
    return cmap[3:]


def three_class_model() -> onnx.ModelProto:
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[N, 3, 16, 16] x) => (float[N, 3, 16, 16] prob) {
        prob = Softmax <axis = 1> (x)
    }
    """
    return onnx.parser.parse_model(text)


def half_green(width: int, height: int) -> np.ndarray:
    """Left half green (class 1 for channel_vote_model), right half red (class 0)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 1] = 255
    image[:, width // 2:, 0] = 255
    return image


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(half_green(32, 24)).save(root / "a.png")
    Image.fromarray(half_green(40, 20)).save(root / "sub" / "b.jpg", quality=100)
    return root


def test_palette_is_paddleseg_s():
    assert color_map(256) == paddleseg_color_map(256)


def test_label_pngs_have_the_palette_and_the_image_size(tmp_path, images):
    out = tmp_path / "out"
    result = predict(channel_vote_model(), images, out_dir=out, preprocess=PRE, threads=1, progress=False)
    assert result.images == 2 and result.images_per_s > 0
    for name, size in (("a", (32, 24)), ("sub/b", (40, 20))):
        png = Image.open(out / f"{name}.png")
        assert png.mode == "P" and png.size == size
        assert png.getpalette()[:768] == paddleseg_color_map(256)
        labels = np.asarray(png)
        w = size[0]
        assert (labels[:, : w // 2 - 2] == 1).all() and (labels[:, w // 2 + 2:] == 0).all()
        assert Image.open(out / f"{name}_overlay.jpg").size == size
    assert not (out / "a_matte.png").exists()


def test_matte_and_background_of_a_two_class_model(tmp_path, images):
    out = tmp_path / "out"
    predict(channel_vote_model(), images / "a.png", out_dir=out, preprocess=PRE, matte=True, bg="0,0,255",
            threads=1, progress=False)
    # green pixels: normalized r=-1, g=1, so p1 = 1 / (1 + exp(r - g)); red pixels the reverse
    p_green = 1 / (1 + np.exp(-2.0))
    matte = np.asarray(Image.open(out / "a_matte.png"))
    assert matte.shape == (24, 32)
    assert abs(int(matte[5, 3]) - round(255 * p_green)) <= 1
    assert abs(int(matte[5, 28]) - round(255 * (1 - p_green))) <= 1
    bg = np.asarray(Image.open(out / "a_bg.jpg")).astype(int)
    a = matte[5, 3] / 255
    expected = a * np.array([0, 255, 0]) + (1 - a) * np.array([0, 0, 255])
    assert np.abs(bg[5, 3] - expected).max() <= 6  # JPEG


def test_background_image_is_resized_to_each_image(tmp_path, images):
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(tmp_path / "bg.png")
    out = tmp_path / "out"
    predict(channel_vote_model(), images, out_dir=out, preprocess=PRE, bg=tmp_path / "bg.png", threads=1,
            progress=False)
    assert Image.open(out / "sub" / "b_bg.jpg").size == (40, 20)


def test_matte_needs_two_classes_and_leaves_no_output(tmp_path, images):
    with pytest.raises(ConfigError, match="2-class"):
        predict(three_class_model(), images, out_dir=tmp_path / "out", preprocess=PRE, matte=True, threads=1,
                progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_bad_background_colour_is_a_config_error(tmp_path, images):
    with pytest.raises(ConfigError, match="colour"):
        predict(channel_vote_model(), images, out_dir=tmp_path / "o", preprocess=PRE, bg="no-such-colour",
                progress=False)


def test_png_miou_equals_evaluate_on_the_same_data(tmp_path):
    config = write_vote_dataset(tmp_path / "data", count=5, size=16, flip_label_pixels=5)
    # a coarser input than the labels: bilinear back-resizing makes real mistakes at edges
    raw = yaml.safe_load(config.read_text())
    raw["val_dataset"]["transforms"][0]["target_size"] = [8, 8]
    config.write_text(yaml.safe_dump(raw))
    model = channel_vote_model(8, 8)
    expected = evaluate(model, config, threads=1, progress=False).metrics
    list_file = tmp_path / "data" / "val.txt"
    predict(model, list_file, out_dir=tmp_path / "out", preprocess=config, batch_size=3, threads=1,
            progress=False)
    got = score_outputs(tmp_path / "out", config)
    assert expected.miou < 0.99
    assert got.miou == expected.miou
    assert got.class_iou == expected.class_iou


def test_cli_uses_deploy_yaml_next_to_the_model(tmp_path, images, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(channel_vote_model(), model_dir / "model.onnx")
    (model_dir / "deploy.yaml").write_text(yaml.safe_dump({"Deploy": {"model": "model.onnx", "transforms": PRE}}))
    code = main(["predict", str(model_dir / "model.onnx"), str(images), "-o", str(tmp_path / "out"),
                 "--threads", "1", "--batch_size", "2", "--quiet"])
    assert code == 0
    assert "predicted 2 images" in capsys.readouterr().out
    assert (tmp_path / "out" / "sub" / "b.png").is_file()
    # the folder exists now: a second run needs --overwrite
    assert main(["predict", str(model_dir / "model.onnx"), str(images), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_without_deploy_yaml_or_dataset_config_preprocessing_is_unknown(tmp_path, images):
    onnx.save(channel_vote_model(), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="--dataset_config"):
        predict(tmp_path / "m.onnx", images, out_dir=tmp_path / "out", progress=False)


def test_unknown_runtime_names_the_registered_ones(tmp_path, images):
    with pytest.raises(SlimsegError, match="did you mean 'onnxruntime'.*registered: .*onnxruntime"):
        predict(channel_vote_model(), images, out_dir=tmp_path / "o", runtime="onnxruntim", progress=False)


def test_lists_resolve_against_their_folder_then_dataset_root(tmp_path, images):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("a.png ann/a.png\n\nsub/b.jpg\n")
    found, videos = collect_inputs(lists / "a.txt", dataset_root=images)
    assert [i.name for i in found] == ["a", "sub/b"] and not videos
    (lists / "bad.txt").write_text("a.png\nmissing.png\n")
    with pytest.raises(DataError, match=r"bad.txt:2: image not found"):
        collect_inputs(lists / "bad.txt", dataset_root=images)
    # entries outside the root keep their file name; repeats get a suffix
    (images / "dup.txt").write_text("a.png\n../imgs/a.png\n")
    assert [i.name for i in collect_inputs(images / "dup.txt")[0]] == ["a", "a_1"]
    with pytest.raises(DataError, match="expected an image"):
        (tmp_path / "x.csv").write_text("")
        collect_inputs(tmp_path / "x.csv")


def test_video_without_imageio_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    with pytest.raises(MissingDependencyError, match=r"slimseg\[video\]"):
        predict(channel_vote_model(), tmp_path / "clip.mp4", out_dir=tmp_path / "out", preprocess=PRE,
                progress=False)


def test_a_ten_second_video_round_trips_every_frame(tmp_path):
    pytest.importorskip("imageio", reason="video needs the 'video' extra: pip install 'slimseg[video]'")
    pytest.importorskip("imageio_ffmpeg", reason="video needs the 'video' extra: pip install 'slimseg[video]'")
    from slimseg.video import read_frames, video_info, video_writer

    fps, seconds, size = 10, 10, (64, 48)
    clip = tmp_path / "clip.mp4"
    with video_writer(clip, fps=fps, size=size) as write:
        for i in range(fps * seconds):
            frame = half_green(*size)
            frame[:, (i % 32) + 16] = (255, 255, 255)  # a moving line
            write(frame)
    result = predict(channel_vote_model(), clip, out_dir=tmp_path / "out", preprocess=PRE, matte=True,
                     bg="white", batch_size=4, threads=1, progress=False)
    assert result.frames == fps * seconds and result.videos == 1
    for kind in ("overlay", "mask", "matte", "bg"):
        path = tmp_path / "out" / f"clip_{kind}.mp4"
        info = video_info(path)
        assert info.size == size and info.fps == fps
        assert sum(1 for _ in read_frames(path)) == fps * seconds
    mask = next(read_frames(tmp_path / "out" / "clip_mask.mp4")).astype(int)
    green, red = color_map(2)[3:6], color_map(2)[0:3]  # class 1 on the left, class 0 on the right
    assert np.abs(mask[24, 4] - green).max() < 30 and np.abs(mask[24, 60] - red).max() < 30
