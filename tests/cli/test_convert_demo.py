"""``tread-scale convert demo`` with its defaults writes data that ``yamls/demo.yaml``'s model accepts."""

from tread_scale.cli import main
from tread_scale.config import load_config
from tread_scale.data.metadata import check_against_model, read_metadata

from tests.conftest import REPO


def test_default_demo_data_fits_the_demo_config(tmp_path):
    out = tmp_path / "shapes"
    assert main(["convert", "demo", "--out", str(out), "--no-progress"]) == 0  # every default, as documented
    meta = read_metadata(str(out))
    model = load_config(REPO / "yamls" / "demo.yaml").model
    check_against_model(meta, in_channels=model.in_channels, input_size=model.input_size,
                        num_classes=model.num_classes, where=str(out))  # raises DatasetMismatchError otherwise
    assert tuple(meta.latent_shape) == (3, 16, 16) and meta.num_classes == 6 and meta.num_samples == 4096
