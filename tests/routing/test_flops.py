import pytest

from tread_scale.routing import Route, block_flops, resolve_routes, routed_block_fraction


def test_block_flops_formula():
    assert block_flops(256, 768) == 24 * 256 * 768**2 + 4 * 256**2 * 768 + 12 * 768**2


@pytest.mark.parametrize("depth,hidden,route,expected", [
    (12, 768, Route(0.5, 2, 8), 0.70),   # DiT-B/2, the reference config (spec §3.5)
    (28, 1152, Route(0.5, 2, 24), 0.58),  # DiT-XL/2, the paper's route
])
def test_routed_fraction_matches_spec(depth, hidden, route, expected):
    frac = routed_block_fraction(resolve_routes([route], depth), depth, 256, hidden)
    assert frac == pytest.approx(expected, abs=0.006)


def test_no_routes_is_dense():
    assert routed_block_fraction([], 12, 256, 768) == 1.0
