import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError
from common.models import FeatureCache, build_model, count_parameters, trained_part


@pytest.mark.parametrize("channels", [1, 3])
def test_default_cnn_is_opacus_valid_and_small(channels: int):
    model = build_model("cnn", in_channels=channels, num_classes=7, image_size=28)
    assert ModuleValidator.validate(model, strict=False) == []
    assert 50_000 < count_parameters(model) < 200_000
    assert model(torch.zeros(3, channels, 28, 28)).shape == (3, 7)


def test_resnet18_is_made_opacus_valid():
    model = build_model("resnet18", in_channels=1, num_classes=10, image_size=28)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_same_seed_same_initial_weights_on_both_sides():
    torch.manual_seed(5)
    a = build_model("cnn", in_channels=1, num_classes=10, image_size=28).state_dict()
    torch.manual_seed(5)
    b = build_model("cnn", in_channels=1, num_classes=10, image_size=28).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="'model' = 'vgg'"):
        build_model("vgg", in_channels=1, num_classes=10, image_size=28)


@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 64)])
def test_scatternet_sends_only_its_head_and_its_features_are_fixed(channels: int, side: int):
    """The scattering filters are data-independent constants: no parameters, nothing in the state dict (so nothing
    is sent, masked or aggregated), the same output for the same image whatever else is in the batch."""
    model = build_model("scatternet", in_channels=channels, num_classes=7, image_size=side)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not list(model.frontend.parameters()) and list(model.frontend.buffers())
    assert sorted(model.state_dict()) == ["head.2.bias", "head.2.weight"]
    assert count_parameters(model) == (81 * channels * (side // 4) ** 2 + 1) * 7
    images = torch.rand(5, channels, side, side) * 2 - 1
    alone = model.frontend(images[:1])
    assert alone.shape == (1, 81 * channels, side // 4, side // 4)
    torch.testing.assert_close(model.frontend(images)[:1], alone)
    again = build_model("scatternet", in_channels=channels, num_classes=7, image_size=side)
    torch.testing.assert_close(again.frontend(images), model.frontend(images), rtol=0, atol=0)


def test_scatternet_needs_a_side_divisible_by_four():
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_model("scatternet", in_channels=1, num_classes=10, image_size=30)


def test_fixed_features_are_cached_by_content_and_never_served_stale():
    model = build_model("scatternet", in_channels=1, num_classes=10, image_size=28)
    cache = FeatureCache(max_bytes=2 * 6 * 81 * 7 * 7 * 4)  # two sets of six images' features
    images = torch.rand(6, 1, 28, 28)
    first = cache.of(model.frontend, images, torch.device("cpu"))
    assert cache.of(model.frontend, images.clone(), torch.device("cpu")) is first  # same content: no recompute
    changed = images.clone()
    changed[3, 0, 5, 5] += 0.5
    other = cache.of(model.frontend, changed, torch.device("cpu"))
    assert other is not first and not torch.equal(other[3], first[3]) and torch.equal(other[0], first[0])
    torch.testing.assert_close(other, model.frontend(changed), rtol=0, atol=0)
    cache.of(model.frontend, torch.rand(6, 1, 28, 28), torch.device("cpu"))  # a third set evicts the oldest
    assert cache.of(model.frontend, images, torch.device("cpu")) is not first
    head, features = trained_part(model, images)
    assert head is model.head and torch.equal(features, first)


class CountingFrontend(nn.Module):
    """ScatterNet's frontend, counting the images it transforms."""

    def __init__(self, frontend: nn.Module) -> None:
        super().__init__()
        self.frontend, self.cache_key, self.images = frontend, frontend.cache_key, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.frontend(x)


def test_features_kept_on_disk_serve_a_new_process_and_a_bad_file_is_recomputed(tmp_path, caplog):
    model = build_model("scatternet", in_channels=1, num_classes=10, image_size=28)
    images, cpu = torch.rand(6, 1, 28, 28), torch.device("cpu")
    first = FeatureCache(max_bytes=2**20)
    first.keep_on_disk(tmp_path / "features")
    computed = first.of(model.frontend, images, cpu)
    [kept] = (tmp_path / "features").glob("*.pt")
    assert kept.stat().st_mode & 0o077 == 0  # derived from the site's images: private to the site's account

    frontend = CountingFrontend(model.frontend)
    fresh = FeatureCache(max_bytes=2**20)  # a new process: empty memory, same state folder
    fresh.keep_on_disk(tmp_path / "features")
    assert torch.equal(fresh.of(frontend, images, cpu), computed) and frontend.images == 0

    kept.write_bytes(kept.read_bytes()[:100])  # torn, or anything else that is not these features
    torn = FeatureCache(max_bytes=2**20)
    torn.keep_on_disk(tmp_path / "features")
    assert torch.equal(torn.of(frontend, images, cpu), computed) and frontend.images == 6
    assert "could not be read" in caplog.text

    other = images.clone()  # the same shape, one pixel changed: its own file, never the first's
    other[2, 0, 9, 9] += 0.5
    assert torch.equal(torn.of(frontend, other, cpu), model.frontend(other)) and frontend.images == 12
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2


def test_features_are_still_served_when_the_disk_refuses_them(tmp_path, caplog):
    model = build_model("scatternet", in_channels=1, num_classes=10, image_size=28)
    (tmp_path / "features").write_text("a file where the folder should be")
    cache = FeatureCache(max_bytes=2**20)
    cache.keep_on_disk(tmp_path / "features")
    images = torch.rand(4, 1, 28, 28)
    assert torch.equal(cache.of(model.frontend, images, torch.device("cpu")), model.frontend(images))
    assert "could not be kept" in caplog.text


def test_the_features_kept_on_disk_stay_within_their_byte_budget(tmp_path, monkeypatch):
    model = build_model("scatternet", in_channels=1, num_classes=10, image_size=28)
    cache = FeatureCache(max_bytes=2**20)
    cache.keep_on_disk(tmp_path / "features")
    one_set = 4 * 81 * 7 * 7 * 4  # bytes of four images' features, as torch stores them (plus a header)
    monkeypatch.setattr(FeatureCache, "MAX_DISK_BYTES", int(2.5 * (one_set + 1500)))
    sets = [torch.rand(4, 1, 28, 28) for _ in range(4)]
    for images in sets:
        cache.of(model.frontend, images, torch.device("cpu"))
    kept = list((tmp_path / "features").glob("*.pt"))
    assert len(kept) == 2  # the two most recently used; the first two were evicted
    assert {cache._file(k) for k in list(cache._entries)[-2:]} == set(kept)
    monkeypatch.setattr(FeatureCache, "MIN_FREE_BYTES", 2**62)  # a disk nearly full: nothing more is written
    cache.of(model.frontend, torch.rand(4, 1, 28, 28), torch.device("cpu"))
    assert len(list((tmp_path / "features").glob("*.pt"))) == 2
