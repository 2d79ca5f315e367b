"""Evaluation metrics (``nonrigid.metrics``): CLIP-T, LPIPS (VGG) and the LAION aesthetic score.

Offline throughout. CLIP and VGG have random weights (the tiny variants, or a random full-size VGG16 saved to a
file and read through the real loader); the LPIPS linear layers are the real ones shipped in the ``lpips`` package
and the aesthetic head is the real LAION file from ../shared. Every test would fail if the property it names broke.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import urllib.error
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image
from torchvision.models import vgg as torchvision_vgg

from nonrigid.errors import UsageError
from nonrigid.evaluation.metrics import (
    AESTHETIC_ENV,
    AESTHETIC_FILENAME,
    AESTHETIC_SHA256,
    VGG16_FILENAME,
    Metrics,
    aesthetic_score,
    build_tiny_clip,
    clip_t,
    load_aesthetic_head,
    load_clip,
    load_lpips,
    lpips_distance,
)
from nonrigid.images import load_image

AESTHETIC_FILE = SHARED / "weights" / "aesthetic" / AESTHETIC_FILENAME
LAION_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the LAION head's Sequential (1, 3, 5 are Dropout)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network: the hub is offline and torch.hub's downloader fails like an offline one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.fixture(scope="module")
def tiny() -> Metrics:
    return Metrics.tiny(seed=0)


@pytest.fixture(scope="session")
def aesthetic_file():
    if not AESTHETIC_FILE.is_file():
        pytest.skip(f"the LAION aesthetic head is not at {AESTHETIC_FILE} (expected ../shared beside the project)")
    return AESTHETIC_FILE


@pytest.fixture(scope="module")
def cat_image(tedbench) -> Image.Image:
    return load_image(tedbench / "originals" / "cat.jpeg", size=64)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-layout VGG16 checkpoint (``features.*`` keys) with random weights: 58 MB, written once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        features = torchvision_vgg.make_layers(torchvision_vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILENAME
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, path)
    return path


def with_noise(image: Image.Image, amplitude: float, seed: int = 0) -> Image.Image:
    """The image plus a fixed Gaussian noise pattern scaled by ``amplitude`` (in 0-255 units)."""
    noise = np.random.default_rng(seed).standard_normal((image.height, image.width, 3))
    pixels = np.asarray(image, dtype=np.float64) + amplitude * noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def assert_one_line_naming(err: pytest.ExceptionInfo, *names: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


# --------------------------------------------------------------------------------------------------- LPIPS


def test_lpips_of_an_image_with_itself_is_exactly_zero(tiny, dog_image):
    assert lpips_distance(tiny.lpips, dog_image, dog_image) == 0.0
    assert lpips_distance(tiny.lpips, dog_image, dog_image.copy()) == 0.0


def test_lpips_grows_with_added_noise(tiny, dog_image):
    amplitudes = [2, 4, 8, 16, 32, 64]
    noisy = [with_noise(dog_image, amplitude) for amplitude in amplitudes]
    distances = lpips_distance(tiny.lpips, [dog_image] * len(amplitudes), noisy)
    assert distances[0] > 0
    assert all(a < b for a, b in itertools.pairwise(distances)), distances


def test_lpips_equals_the_lpips_package_on_the_same_weights(vgg_file, dog_image, cat_image, monkeypatch):
    """Our VGG LPIPS (real v0.1 linear weights from the package, random VGG trunk read from a torchvision-layout
    file) equals the reference implementation given the same trunk weights."""
    lpips_package = pytest.importorskip("lpips")
    ours = load_lpips(vgg_weights=vgg_file, device="cpu")
    assert ours.sources["linear_weights"].replace("\\", "/").endswith("lpips/weights/v0.1/vgg.pth")

    # The reference keeps only vgg16().features; give it just those rather than initialise a 120 M classifier.
    def features_only(**kwargs) -> SimpleNamespace:
        return SimpleNamespace(features=torchvision_vgg.make_layers(torchvision_vgg.cfgs["D"]))

    monkeypatch.setattr(lpips_package.pretrained_networks.tv, "vgg16", features_only)
    reference = lpips_package.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    reference.load_state_dict(
        torch.load(ours.sources["linear_weights"], map_location="cpu", weights_only=True), strict=False
    )
    trunk = torch.load(vgg_file, map_location="cpu", weights_only=True)
    # the reference cuts torchvision's features into slices that keep the layer indices: slice2.5.weight = 5.weight
    reference.net.load_state_dict(
        {name: trunk["features." + name.split(".", 1)[1]] for name in reference.net.state_dict()}
    )
    x0 = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x1 = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = reference(x0, x1).reshape(-1)
    torch.testing.assert_close(ours(x0, x1), expected, rtol=1e-5, atol=1e-7)
    # and through the PIL path: images are mapped to [-1, 1] the way the reference's normalize=True does
    unit = [
        torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None] for im in (dog_image, cat_image)
    ]
    with torch.no_grad():
        expected = reference(*unit, normalize=True).item()
    assert lpips_distance(ours, dog_image, cat_image) == pytest.approx(expected, rel=1e-5)


def test_lpips_compares_at_the_source_size(tiny, dog_image):
    big_edit = with_noise(dog_image, 16).resize((96, 96), Image.Resampling.BICUBIC)
    resized_back = big_edit.resize(dog_image.size, Image.Resampling.BICUBIC)
    assert lpips_distance(tiny.lpips, dog_image, big_edit) == lpips_distance(tiny.lpips, dog_image, resized_back)


# --------------------------------------------------------------------------------------------------- CLIP-T


def test_clip_t_is_the_cosine_of_the_models_own_embeddings(tiny, dog_image, cat_image):
    """CLIP-T equals CLIPModel's own logits_per_image divided by its logit scale: a cosine in [-1, 1], not x100."""
    clip = tiny.clip
    images, texts = [dog_image, cat_image], ["a dog", "a cat on a mat"]
    scores = clip_t(clip, images, texts)
    tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = clip.image_processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = clip.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    expected = (out.logits_per_image / clip.model.logit_scale.exp()).diagonal()
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-6)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert clip_t(clip, dog_image, "a dog") == pytest.approx(scores[0], abs=1e-6)  # single pair -> float


def test_clip_t_is_higher_for_the_matching_text_when_the_backbone_makes_it_so(dog_image, cat_image):
    """A random CLIP has no idea what a dog is, so we make the backbone "know" by construction: the text projection
    is solved (least squares, exact for two texts) so that text i's projected embedding *is* image i's projected
    embedding. Then CLIP-T(image i, text i) = 1 and a mismatched pair scores lower; this would fail if clip_t paired
    the wrong image with a text, skipped a projection or compared unnormalised vectors."""
    clip = build_tiny_clip(seed=1)
    images, texts = [dog_image, cat_image], ["a dog", "a cat"]  # same length: identical padding in every batch
    with torch.no_grad():
        targets = clip.image_embeddings(images)  # (2, D)
        tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
        pooled = clip.model.text_model(**tokens).pooler_output  # (2, H)
        clip.model.text_projection.weight.copy_(targets.T @ torch.linalg.pinv(pooled.T))
    image_cosine = torch.nn.functional.cosine_similarity(targets[0], targets[1], dim=0).item()
    assert image_cosine < 0.999  # the two images' embeddings differ, so the ordering below means something
    dog_dog, dog_cat, cat_dog, cat_cat = clip_t(clip, [dog_image, dog_image, cat_image, cat_image], texts * 2)
    assert dog_dog == pytest.approx(1.0, abs=1e-4) and cat_cat == pytest.approx(1.0, abs=1e-4)
    assert dog_dog > dog_cat and cat_cat > cat_dog
    assert dog_cat == pytest.approx(image_cosine, abs=1e-4)


# --------------------------------------------------------------------------------------------------- aesthetic


def test_real_aesthetic_head_equals_an_independent_computation(aesthetic_file):
    head = load_aesthetic_head(aesthetic_file)
    assert head.sha256 == AESTHETIC_SHA256 == hashlib.sha256(aesthetic_file.read_bytes()).hexdigest()
    assert head.input_size == 768
    state = torch.load(aesthetic_file, map_location="cpu", weights_only=True)
    embedding = torch.randn(768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hidden = embedding / embedding.norm()  # the head reads L2-normalised embeddings; no activations in between
    for layer in LAION_LAYERS:
        hidden = state[f"layers.{layer}.weight"].double() @ hidden + state[f"layers.{layer}.bias"].double()
    expected = hidden.item()
    assert head(embedding.float()[None]).item() == pytest.approx(expected, abs=1e-5)
    assert head(3.0 * embedding.float()[None]).item() == pytest.approx(expected, abs=1e-5)  # scale-free input


def test_an_aesthetic_head_file_with_the_wrong_hash_is_refused(aesthetic_file, tmp_path):
    tampered = tmp_path / AESTHETIC_FILENAME
    data = bytearray(aesthetic_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="sha256") as err:
        load_aesthetic_head(tampered)
    assert_one_line_naming(err, str(tampered))


def test_the_aesthetic_head_is_fetched_once_into_the_cache_and_verified(aesthetic_file, tmp_path, monkeypatch):
    monkeypatch.setenv("NONRIGID_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(AESTHETIC_ENV, raising=False)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        shutil.copyfile(aesthetic_file, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    first = load_aesthetic_head()
    second = load_aesthetic_head()
    cached = tmp_path / "weights" / "aesthetic" / AESTHETIC_FILENAME
    assert len(calls) == 1 and calls[0].endswith(AESTHETIC_FILENAME)
    assert first.source == second.source == str(cached) and second.sha256 == AESTHETIC_SHA256

    def corrupt_download(url, dst, hash_prefix=None, progress=True):
        with open(dst, "wb") as handle:
            handle.write(b"not the head")

    cached.unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", corrupt_download)
    with pytest.raises(UsageError, match="sha256"):
        load_aesthetic_head()
    assert not cached.exists()  # a wrong download is never left where the next run would find it


def test_aesthetic_head_needs_embeddings_of_its_width(aesthetic_file, dog_image):
    with pytest.raises(UsageError, match="768") as err:
        aesthetic_score(build_tiny_clip(), load_aesthetic_head(aesthetic_file), dog_image)
    assert_one_line_naming(err, "ViT-L/14")


# --------------------------------------------------------------------------------------------------- Metrics


def test_batch_scores_equal_single_scores(tiny, dog_image, cat_image):
    sources = [dog_image, cat_image, dog_image]
    edited = [
        with_noise(dog_image, 20),
        cat_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        with_noise(dog_image, 40).resize((80, 80)),
    ]
    texts = ["a jumping dog", "a sitting cat", "a dog"]
    batch = tiny.score_batch(sources, edited, texts)
    assert [set(scores) for scores in batch] == [{"clip_t", "lpips", "aesthetic"}] * 3
    for scores, triple in zip(batch, zip(sources, edited, texts, strict=True), strict=True):
        single = tiny.score(*triple)
        for key in scores:
            assert scores[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert batch[0]["lpips"] != batch[2]["lpips"] and batch[0]["clip_t"] != batch[1]["clip_t"]


def test_metrics_from_local_paths_match_the_standalone_functions(vgg_file, aesthetic_file, tmp_path, dog_image):
    """The real loading paths, offline: a CLIP folder written by save_pretrained (768-wide, like ViT-L/14, so the
    real head accepts it), a VGG16 file, the packaged LPIPS linear weights and the real aesthetic head."""
    saved = build_tiny_clip(seed=2, projection_dim=768)
    saved.save_pretrained(tmp_path / "clip")
    metrics = Metrics(str(tmp_path / "clip"), vgg_weights=vgg_file, aesthetic_head=aesthetic_file, device="cpu")
    edit = with_noise(dog_image, 24)
    scores = metrics.score(dog_image, edit, "a jumping dog")
    torch.testing.assert_close(metrics.clip.image_embeddings([edit]), saved.image_embeddings([edit]))
    assert scores["clip_t"] == pytest.approx(clip_t(saved, edit, "a jumping dog"), abs=1e-6)
    assert scores["lpips"] == pytest.approx(lpips_distance(metrics.lpips, dog_image, edit), abs=1e-7)
    assert scores["lpips"] > 0 and lpips_distance(metrics.lpips, dog_image, dog_image) == 0.0
    assert scores["aesthetic"] == pytest.approx(aesthetic_score(saved, metrics.aesthetic_head, edit), abs=1e-5)
    record = metrics.describe()
    assert record["aesthetic"]["sha256"] == AESTHETIC_SHA256
    assert record["lpips"]["vgg_sha256"] == hashlib.sha256(vgg_file.read_bytes()).hexdigest()
    assert record["clip_t"]["backbone"] == str(tmp_path / "clip")


def test_tiny_metrics_are_reproducible_and_describe_themselves(dog_image):
    first, second = Metrics.tiny(seed=3), Metrics.tiny(seed=3)
    edit = with_noise(dog_image, 10)
    assert first.score(dog_image, edit, "a dog") == second.score(dog_image, edit, "a dog")
    assert first.aesthetic_head.input_size == first.clip.projection_dim
    record = first.describe()
    assert record["aesthetic"]["sha256"] is None and record["clip_t"]["backbone"].startswith("tiny")


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "load, missing",
    [
        (lambda p: Metrics(aesthetic_head=p / "head.pth").aesthetic_head, "head.pth"),
        (lambda p: load_lpips(lpips_weights=p / "vgg.pth"), "vgg.pth"),
        (lambda p: load_lpips(vgg_weights=p / "vgg16.pth"), "vgg16.pth"),
        (lambda p: load_clip(str(p / "clip-folder")), "clip-folder"),
        (lambda p: load_clip("nobody/no-such-clip"), "nobody/no-such-clip"),
    ],
    ids=["aesthetic", "lpips-linear", "vgg", "clip-folder", "clip-hub-id"],
)
def test_a_missing_weight_is_a_one_line_usage_error_naming_it(load, missing, tmp_path):
    with pytest.raises(UsageError) as err:
        load(tmp_path)
    assert_one_line_naming(err, missing)


def test_default_locations_offline_say_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NONRIGID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(AESTHETIC_ENV, raising=False)
    with pytest.raises(UsageError) as err:
        load_lpips()
    assert_one_line_naming(err, VGG16_FILENAME, str(tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILENAME))
    with pytest.raises(UsageError) as err:
        load_aesthetic_head()
    assert_one_line_naming(err, str(tmp_path / "cache" / "weights" / "aesthetic" / AESTHETIC_FILENAME))
    monkeypatch.setenv(AESTHETIC_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(UsageError) as err:
        load_aesthetic_head()
    assert_one_line_naming(err, str(tmp_path / "elsewhere.pth"), AESTHETIC_ENV)
