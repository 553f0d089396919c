import pytest

from tread_scale.errors import RouteError
from tread_scale.routing import Route, resolve_routes


def test_negative_indices_count_from_the_end():
    r = resolve_routes([Route(0.5, 2, -4)], 28)
    assert (r[0].start, r[0].end, r[0].num_blocks) == (2, 24, 23)


def test_mappings_are_accepted():
    assert resolve_routes([{"rate": 0.25, "start": 0, "end": 0}], 4)[0].rate == 0.25


@pytest.mark.parametrize("routes,message", [
    ([Route(0.5, 2, 30)], r"routing.routes\[0\] \(rate=0.5, start=2, end=30\): end=30 is outside a model of depth 28"),
    ([Route(1.0, 2, 8)], r"routing.routes\[0\].*0 <= rate < 1"),
    ([Route(-0.1, 2, 8)], r"routing.routes\[0\].*0 <= rate < 1"),
    ([Route(0.5, 8, 2)], r"routing.routes\[0\].*start resolves to block 8, after end block 2"),
    ([Route(0.5, 2, 8), Route(0.5, 8, 10)], r"routing.routes\[1\].*sorted and non-overlapping.*routes\[0\] ends at block 8"),
    ([Route(0.5, 10, 12), Route(0.5, 2, 4)], r"routing.routes\[1\].*sorted and non-overlapping"),
    ([Route(0.5, 2.5, 8)], r"routing.routes\[0\].*start must be an integer"),
    ([{"rate": 0.5, "start": 1}], r"routing.routes\[0\].*missing \['end'\]"),
])
def test_bad_routes_name_the_route(routes, message):
    with pytest.raises(RouteError, match=message):
        resolve_routes(routes, 28)
