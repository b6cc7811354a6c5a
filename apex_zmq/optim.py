"""Adam and RMSProp updates without ``torch.optim``.

``torch.optim``'s optimizers import ``torch._dynamo`` (~800 modules) on construction and on every first
call of ``step``/``zero_grad``/``state_dict``: 0.7 s on a quiet Zen 4-class core, 3-8 s on 2 cores while the
other roles import torch, on the learner's path to its first training step. ``Adam`` makes torch's updates
(same operation order as torch's ``foreach`` implementation, so the same floats; tests compare them step by
step); ``RMSprop`` is TensorFlow's (epsilon inside the square root, as the papers' optimizers), tested
against that formula written out. Both run ``torch._foreach_*`` kernels on one flat buffer (see
``_Optimizer``) and keep ``torch.optim``'s state-dict layout, so a checkpoint written with ``torch.optim``
(earlier versions of this project) still loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def _flat_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped as each tensor of ``like``, end to end."""
    views, o = [], 0
    for t in like:
        views.append(flat[o:o + t.numel()].view_as(t))
        o += t.numel()
    return views


def kind_of(sd: dict) -> str | None:
    """Which optimizer wrote the state dict ``sd`` (ours or ``torch.optim``'s): "adam", "rmsprop", or None
    when its hyperparameters do not say."""
    groups = sd.get("param_groups") or [{}]
    if "betas" in groups[0]:
        return "adam"
    if "alpha" in groups[0]:
        return "rmsprop"
    return None


class _Optimizer:
    """Parameters, their per-parameter state tensors (``slots``) and the step count.

    Parameters of one dtype and device are re-seated as views of one flat buffer, and so are their
    gradients (autograd adds into an existing ``.grad`` in place) and the state slots: an update is then
    a handful of kernels on one tensor, where the ``foreach`` ops loop over the tensors on CPU (a small
    network's ~10 tensors cost ~0.3 ms of a 1 ms training step). Call ``zero_grad`` (which zeroes the
    buffer and keeps the views) rather than setting ``.grad`` to None; a gradient set by hand is copied in,
    and a parameter left without one makes that step take the per-tensor path (it is left alone).

    Only parameters contiguous in the default memory format are flattened: a view of a flat buffer has
    that format, so re-seating would silently drop a channels-last layout (what the learner sets for
    cuDNN's tensor-core convolutions on a GPU). With any other layout, or mixed dtypes or devices, every
    step takes the per-tensor ``foreach`` path on the parameters as they are, with state slots of their
    layout. A re-seated parameter must stay a view: every step checks that each still points into the
    buffer (``.to()``, ``.data = ...`` or a swap would leave the optimizer updating a buffer nothing
    reads) and, given ``module``, that the module still holds these parameters
    (``load_state_dict(assign=True)`` puts new ones in), and raises ``RuntimeError`` otherwise.
    """

    slots: tuple[str, ...] = ()
    kind = ""  # what ``kind_of`` says of this optimizer's state dict

    def __init__(self, params: Iterable[torch.Tensor], hyper: dict, module: torch.nn.Module | None = None) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("an optimizer needs at least one parameter")
        self.hyper = hyper  # torch.optim's param_group keys and values: also the state dict's
        self.steps = 0
        p0 = self.params[0]
        self.flat: torch.Tensor | None = None
        if all(p.dtype == p0.dtype and p.device == p0.device and p.is_contiguous() for p in self.params):
            with torch.no_grad():
                self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
                self.flat_grad = torch.zeros_like(self.flat)
            for p, v in zip(self.params, _flat_views(self.flat, self.params)):
                p.data = v
            self._grads = _flat_views(self.flat_grad, self.params)
            for p, g in zip(self.params, self._grads):
                p.grad = g
            self.flat_state = {s: torch.zeros_like(self.flat) for s in self.slots}
            self.state = {s: _flat_views(f, self.params) for s, f in self.flat_state.items()}
            self._ptrs = [p.data_ptr() for p in self.params]
        else:
            self.state = {s: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
                          for s in self.slots}
        # (owner, name, parameter): one dict lookup each per step, where walking module.parameters() cost
        # ~40 us (4% of a small network's step)
        ours = {id(p) for p in self.params}
        self._owners = [(m, n, p) for m in (module.modules() if module is not None else ())
                        for n, p in m._parameters.items() if p is not None and id(p) in ours]

    def _check_seated(self) -> None:
        """Raise if a parameter left the flat buffer or the module holds other parameters than ours."""
        for m, n, p in self._owners:
            if m._parameters.get(n) is not p:
                raise RuntimeError(f"the module's parameter {n!r} of {type(m).__name__} is not the one this "
                                   f"optimizer updates (replaced, e.g. by load_state_dict(assign=True)): "
                                   f"build the optimizer after the network is in place")
        if self.flat is not None and [p.data_ptr() for p in self.params] != self._ptrs:
            bad = next(i for i, (p, q) in enumerate(zip(self.params, self._ptrs)) if p.data_ptr() != q)
            raise RuntimeError(f"parameter {bad} ({tuple(self.params[bad].shape)}) no longer shares the "
                               f"optimizer's flat buffer (moved by .to(), .data = or a swap after the optimizer "
                               f"was built): build the optimizer after the network is on its device")

    @property
    def lr(self) -> float:
        return self.hyper["lr"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (flat: in place, whatever ``set_to_none`` says, so they stay views)."""
        if self.flat is not None:
            self.flat_grad.zero_()
            for p, g in zip(self.params, self._grads):
                if p.grad is not g:
                    p.grad = g
            return
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _flat_ready(self) -> bool:
        """Whether every gradient is (now) its view of the flat buffer; copies in ones set by hand."""
        if self.flat is None:
            return False
        for p, g in zip(self.params, self._grads):
            if p.grad is g:
                continue
            if p.grad is None:
                return False
            g.copy_(p.grad)
            p.grad = g
        return True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters (one norm on the flat buffer);
        returns the norm before clipping. ``max_norm <= 0`` means no clipping (``--grad-clip 0``), as the
        parameter server reads it: torch's factor max_norm / norm would zero (or flip) every gradient."""
        self._check_seated()
        if not self._flat_ready():
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else math.inf)
        total = torch.linalg.vector_norm(self.flat_grad)
        if max_norm > 0:
            self.flat_grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def _with_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(params, grads, state slots) of the parameters that have a gradient this step."""
        keep = [i for i, p in enumerate(self.params) if p.grad is not None]
        return ([self.params[i] for i in keep], [self.params[i].grad for i in keep],
                {s: [v[i] for i in keep] for s, v in self.state.items()})

    @torch.no_grad()
    def step(self) -> None:
        """One update with the gradients in ``.grad`` (parameters without one are left alone)."""
        self._check_seated()
        if self._flat_ready():
            self.steps += 1
            self._update([self.flat], [self.flat_grad], {s: [f] for s, f in self.flat_state.items()})
            return
        params, grads, state = self._with_grads()
        self.steps += 1
        if params:
            self._update(params, grads, state)

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                state: dict[str, list[torch.Tensor]]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``torch.optim``'s format: {"state": {index: {"step", slots...}}, "param_groups": [...]}."""
        state = {i: {"step": torch.tensor(float(self.steps)), **{s: self.state[s][i] for s in self.slots}}
                 for i in range(len(self.params))}
        return {"state": state, "param_groups": [{**self.hyper, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict) -> None:
        """Load our state dict or a ``torch.optim`` one of the same optimizer over the same parameters
        (a parameter that had no step yet has no state there: its slots stay zero). Another optimizer's
        state, or slots of another shape or dtype, are a ``ValueError`` saying what differs, raised before
        anything is loaded (``copy_`` would broadcast or convert them without a word)."""
        kind = kind_of(sd)
        if kind is not None and kind != self.kind:
            raise ValueError(f"optimizer state of {kind}, this optimizer is {self.kind}")
        groups = sd["param_groups"]
        n = sum(len(g["params"]) for g in groups)
        if n != len(self.params):
            raise ValueError(f"optimizer state for {n} parameters, this network has {len(self.params)}")
        order = [i for g in groups for i in g["params"]]
        found = []
        for k, i in enumerate(order):
            st = sd["state"].get(i)
            if not st:
                continue
            missing = [s for s in self.slots if s not in st]
            if missing:
                raise ValueError(f"optimizer state without {missing}: not a {type(self).__name__} state "
                                 f"with these settings ({self.hyper})")
            for s in self.slots:
                own, got = self.state[s][k], st[s]
                if got.shape != own.shape or got.dtype != own.dtype:
                    raise ValueError(f"optimizer state {s!r} of parameter {k} is {got.dtype} {list(got.shape)}, "
                                     f"this parameter is {own.dtype} {list(own.shape)}")
            found.append((k, st))
        steps = 0
        for k, st in found:
            for s in self.slots:
                self.state[s][k].copy_(st[s])
            steps = max(steps, int(float(st["step"])))
        self.steps = steps


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015, bias-corrected): ``torch.optim.Adam`` without weight decay or amsgrad."""

    slots = ("exp_avg", "exp_avg_sq")
    kind = "adam"

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, module: torch.nn.Module | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0, amsgrad=False), module)

    def _update(self, params, grads, state) -> None:
        beta1, beta2 = self.hyper["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - beta2 ** self.steps) ** 0.5)
        torch._foreach_add_(denom, self.hyper["eps"])
        torch._foreach_addcdiv_(params, m, denom, (self.lr / (1 - beta1 ** self.steps)) * -1)


class RMSprop(_Optimizer):
    """RMSProp (Tieleman & Hinton) with epsilon inside the square root, as TensorFlow's ``RMSPropOptimizer``
    (which the DQN, Ape-X and A3C papers used) and unlike ``torch.optim.RMSprop``::

        ms = alpha * ms + (1 - alpha) * g**2
        mg = alpha * mg + (1 - alpha) * g                      # centered only
        p -= lr * g / sqrt(ms - mg**2 + eps)                   # centered (Graves 2013; Ape-X's learner)
        p -= lr * g / sqrt(ms + eps)                           # not centered (A3C's shared RMSProp)

    Outside the root (torch), a parameter whose gradient is steady has ms - mg**2 -> 0 and a step of up
    to lr * g / eps; inside, the step is bounded by lr * g / sqrt(eps) (2,600x smaller at eps 1.5e-7).
    No momentum or weight decay. The state dict keeps ``torch.optim.RMSprop``'s layout (square_avg,
    grad_avg: the same statistics whatever the convention, so a torch checkpoint loads).
    """

    kind = "rmsprop"

    def __init__(self, params: Iterable[torch.Tensor], lr: float, alpha: float = 0.95, eps: float = 1.5e-7,
                 centered: bool = False, module: torch.nn.Module | None = None) -> None:
        self.slots = ("square_avg", "grad_avg") if centered else ("square_avg",)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, centered=centered, momentum=0, weight_decay=0,
                                      eps_inside=True), module)

    def _update(self, params, grads, state) -> None:
        alpha = self.hyper["alpha"]
        sq = state["square_avg"]
        torch._foreach_mul_(sq, alpha)
        torch._foreach_addcmul_(sq, grads, grads, 1 - alpha)
        if self.hyper["centered"]:
            g = state["grad_avg"]
            torch._foreach_lerp_(g, grads, 1 - alpha)
            avg = torch._foreach_addcmul(sq, g, g, -1)
            torch._foreach_add_(avg, self.hyper["eps"])
        else:
            avg = torch._foreach_add(sq, self.hyper["eps"])
        torch._foreach_sqrt_(avg)
        torch._foreach_addcdiv_(params, grads, avg, -self.lr)
