"""Fake CUDA tensors on a CPU-only torch: where the GPU path's device rules can be checked.

``fake_cuda()`` opens a ``FakeTensorMode`` and yields ``fake(shape, dtype)``: a tensor with device
``cuda:0``, meta storage and no data. Ops on it run torch's own meta / fake kernels, with the
device checks of a real GPU (a CPU mask in ``masked_fill`` raises "found at least two devices").
What cannot run on them with a CPU-only build (it aborts or raises "not linked with support for
cuda devices"): Python indexing (``x[i]``, ``~x``), autograd (call a Function's forward/backward
directly), megatron's model forward (its embedding). Reading a value back (``.tolist()``,
``.item()``, ``torch.equal``) raises ``DataDependentOutputException``, as it is a device-to-host
sync on a GPU.

``DeviceReads`` counts those reads instead of failing at the first: every read of a CUDA tensor is
recorded (what, where from), and answered from the host tensor it was copied from when there is one
(``host.to("cuda")``), else with zeros (a value computed on the device, e.g. the loss). It also
records every host-to-device copy (``copies``), and keeps ops on real host tensors real (under a
bare FakeTensorMode they would turn fake and unreadable: host code would look like device code).
Used by the host-sync test (tests/unit/test_host_syncs.py) and benchmarks/README's "host syncs per
step".
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def fake_cuda():
    """A FakeTensorMode in which ``fake(shape, dtype=torch.float32)`` (or ``fake(tensor)``) makes
    a CUDA tensor of that shape (the CPU shim's cuda -> cpu redirection, if applied, is suspended
    meanwhile)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from megatron_longctx.runtime import cpu_shim

    shim_mode = cpu_shim._MODE if cpu_shim.is_applied() else None
    if shim_mode is not None:
        shim_mode.__exit__(None, None, None)
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(shape, dtype: torch.dtype | None = None):
        if isinstance(shape, torch.Tensor):
            shape, dtype = shape.shape, dtype or shape.dtype
        meta = torch.empty(tuple(shape), dtype=dtype or torch.float32, device="meta")
        return FakeTensor(mode, meta, CUDA)

    try:
        with mode:
            yield fake
    finally:
        if shim_mode is not None:
            shim_mode.__enter__()


_READS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.item: "item",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.equal: "equal",
}


def _is_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


class DeviceReads(TorchFunctionMode):
    """Counts device-to-host reads of CUDA tensors (see the module docstring).

    Attributes:
        reads: ``(what, caller)`` per read: the op (``tolist``, ``equal``, ``to cpu``...) and the
            innermost project frame that asked for it.
        copies: ``caller`` per host-to-device copy.
    """

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []
        self.copies: list[str] = []
        # id(device tensor) -> (it, the host tensor it copies); holding it keeps the id unique
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        # FakeTensor overrides tolist with one .item() per element; count it as one read
        self._tolist = FakeTensor.tolist
        reads = self

        def tolist(tensor):
            if not _is_cuda(tensor):
                return reads._tolist(tensor)
            reads.reads.append(("tolist", reads._caller()))
            with torch._C.DisableTorchFunction(), unset_fake_temporarily():
                return reads._shadow(tensor).tolist()

        FakeTensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        from torch._subclasses.fake_tensor import FakeTensor

        FakeTensor.tolist = self._tolist
        return super().__exit__(*exc)

    def _caller(self) -> str:
        for frame in reversed(traceback.extract_stack()):
            if "megatron_longctx" in frame.filename and "fake_cuda" not in frame.filename:
                return f"{frame.filename.split('megatron_longctx/')[-1]}:{frame.lineno}"
        return "?"

    def _shadow(self, x):
        if not _is_cuda(x):
            return x
        host = self._host.get(id(x), (None, None))[1]
        if host is None:  # computed on the device: no value to read, zeros of its shape
            return torch.zeros(tuple(x.shape), dtype=x.dtype)
        return host.to(x.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _READS.get(func)
        target = _to_device(func, args, kwargs)
        if name is None and target is not None and target.type == "cpu" and _is_cuda(args[0]):
            name = "to cpu"
        if name is not None and any(_is_cuda(a) for a in args):
            self.reads.append((name, self._caller()))
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with torch._C.DisableTorchFunction(), unset_fake_temporarily():
                return func(*(self._shadow(a) for a in args), **kwargs)
        if _host_only(args, kwargs) and (target is None or target.type != "cuda"):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # host code on host tensors stays real
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if target is not None and target.type == "cuda" and not _is_cuda(args[0]):
            self._host[id(out)] = (out, args[0])
            self.copies.append(self._caller())
        return out


def _host_only(args, kwargs) -> bool:
    """Some real (not fake) tensor among the arguments, no fake one, no CUDA device asked for."""
    from torch._subclasses.fake_tensor import FakeTensor

    values = list(args) + list(kwargs.values())
    flat = [v for a in values for v in (a if isinstance(a, (list, tuple)) else (a,))]
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    devices = [v for v in flat if isinstance(v, (str, torch.device))]
    return (
        bool(tensors)
        and not any(isinstance(t, FakeTensor) for t in tensors)
        and not any("cuda" in str(d) for d in devices)
    )


def _to_device(func, args, kwargs) -> torch.device | None:
    """The target device of a ``Tensor.to`` call, else None."""
    if func is not torch.Tensor.to:
        return None
    device = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            device = a
    return None if device is None else torch.device(device)
