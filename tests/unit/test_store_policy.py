from pycfs.host.oci.layout import inflaters_store

GIB, MIB, KIB = 1 << 30, 1 << 20, 1 << 10


def test_a_lone_layer_keeps_the_object_workers() -> None:
    assert not inflaters_store([GIB])
    assert not inflaters_store([])


def test_a_large_layer_beside_a_tiny_one_keeps_the_object_workers() -> None:
    # a registry image: one big layer and a few KB more
    assert not inflaters_store([GIB, 4 * KIB])
    assert not inflaters_store([GIB, 200 * MIB, 100 * MIB])


def test_layers_that_keep_the_cores_busy_store_in_the_inflaters() -> None:
    assert inflaters_store([GIB, 330 * MIB, 200 * MIB])  # the bench image
    assert inflaters_store([100 * MIB, 100 * MIB])
    assert inflaters_store([2 * MIB, 1 * MIB])
