"""The client is cut into modules (transport, permit, types); every name users imported from
``floodgate`` or ``floodgate.client`` before the cut still imports from there, as the same
object."""

import floodgate
import floodgate.client
import floodgate.permit
import floodgate.types


def test_public_names_keep_their_import_paths() -> None:
    for name in ["Floodgate", "Permit", "Rate", "Adaptive", "KEEP", "Seconds", "DEFAULT_URL"]:
        assert name in floodgate.client.__all__
        assert getattr(floodgate.client, name) is getattr(floodgate, name)
    assert floodgate.client.MAX_SERVER_WAIT == 3600.0
    assert floodgate.client.Permit is floodgate.permit.Permit
    assert floodgate.client.Rate is floodgate.types.Rate


def test_each_module_stays_small() -> None:
    for module in [floodgate.client, floodgate.permit, floodgate.types]:
        path = module.__file__
        assert path is not None
        with open(path, encoding="utf-8") as f:
            assert sum(1 for _ in f) < 600, path
