"""The loopback launcher shares the host's cores among its SuperNodes' processes unless the user chose threads."""

from pathlib import Path

from fedlora.flower.loopback import LoopbackFederation, shared_threads


def test_cores_are_divided_among_supernodes():
    assert shared_threads({}, supernodes=2, cpus=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert shared_threads({}, supernodes=2, cpus=16) == {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert shared_threads({}, supernodes=3, cpus=16)["OMP_NUM_THREADS"] == "5"
    assert shared_threads({}, supernodes=8, cpus=2)["OMP_NUM_THREADS"] == "1"  # never zero threads


def test_a_users_thread_setting_is_kept():
    assert shared_threads({"OMP_NUM_THREADS": "4"}, supernodes=2, cpus=2) == {}
    assert shared_threads({"MKL_NUM_THREADS": "3"}, supernodes=2, cpus=2) == {}


def test_the_federation_environment_carries_the_share(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    fed = LoopbackFederation(tmp_path, supernodes=2)
    expected = shared_threads({}, supernodes=2)["OMP_NUM_THREADS"]
    assert fed.environ["OMP_NUM_THREADS"] == fed.environ["MKL_NUM_THREADS"] == expected
    fed = LoopbackFederation(tmp_path, supernodes=2, env={"OMP_NUM_THREADS": "7"})
    assert fed.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in fed.environ
