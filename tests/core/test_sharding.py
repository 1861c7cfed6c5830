import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jdelta.sharding import logical_to_spec, make_mesh, shard_model


def test_mesh_shape_and_fill():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert dict(make_mesh({"tensor": 2, "fsdp": -1}).shape)["fsdp"] == len(jax.devices()) // 2
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"fsdp": 8, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})


def test_logical_rules_replicate_indivisible_dims():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    # 6 is not divisible by fsdp=4 -> replicated; mlp still sharded
    assert logical_to_spec(("embed", "mlp"), (6, 128), mesh) == P(None, "tensor")
    assert logical_to_spec(("batch", "seq"), (8, 3), mesh) == P("fsdp", None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (4,), mesh)


def test_shard_model_places_params():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((8, 16)), out_sharding=("embed", "mlp"), eager_sharding=False)

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    m = shard_model(M(), mesh)
    assert m.w.get_value().sharding.spec == P("fsdp", "tensor")
    assert float(m.w.get_value().sum()) == 128.0
