"""Batch normalization modules: the Keras-faithful ``BatchNorm`` and PyTorch drop-ins.

Ioffe, S. & Szegedy, C. (2015). *Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift*. arXiv:1502.03167.

Both faces share one base class that owns the parameters and buffers and
delegates the math to :mod:`bnlab.functional`. They differ only in their
constructor arguments and in the conventions those arguments follow:

|                 | ``bnlab.BatchNorm`` (Keras' face)   | ``bnlab.nn.BatchNorm1d/2d/3d`` (PyTorch's face) |
|-----------------|-------------------------------------|-------------------------------------------------|
| feature axis    | ``axis=-1`` (any, or a list)        | dim 1                                           |
| momentum        | weight of the OLD value, ``0.99``   | weight of the NEW value, ``0.1``                |
| epsilon         | ``epsilon=1e-3``                    | ``eps=1e-5``                                    |
| stored variance | biased (``/M``)                     | unbiased (``/(M-1)``)                           |
| state-dict keys | ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` (both faces, so checkpoints load) | the same |
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import constraints as _constraints
from .. import functional as F
from .. import initializers as _initializers
from .. import regularizers as _regularizers

__all__ = ["BatchNorm", "BatchNormalization", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormNd"]

_ESTIMATORS = ("biased", "unbiased")


def _distributed(group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _check_momentum(momentum, meaning: str) -> None:
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] ({meaning}) or None, got {momentum!r}")


def _as_shape(num_features) -> tuple[int, ...] | None:
    if num_features is None:
        return None
    shape = (num_features,) if isinstance(num_features, (int, np.integer)) else tuple(num_features)
    if not shape or any(int(s) < 1 for s in shape):
        raise ValueError(f"num_features must be a positive int or a tuple of them, got {num_features!r}")
    return tuple(int(s) for s in shape)


class _BatchNormBase(nn.Module):
    """Parameters, buffers and the forward pass shared by both faces.

    A face defines ``_old_weight()`` (the weight of the old moving value, or
    ``None`` for a cumulative average) and ``_epsilon()``.
    """

    _version = 2  # version 2 added num_batches_tracked (as in PyTorch)

    # An activation fused after the normalization (BatchNormAct sets these); None: none.
    _act: str | None = None
    _slope: float = 0.01

    # Keras' per-weight options: the Keras face sets them from its arguments, PyTorch's faces keep these.
    beta_initializer = gamma_initializer = moving_mean_initializer = moving_variance_initializer = None
    beta_regularizer = gamma_regularizer = beta_constraint = gamma_constraint = None

    def __init__(
        self,
        *,
        axis,
        num_features,
        center: bool,
        scale: bool,
        moving_variance_estimator: str = "biased",
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not (isinstance(axis, int) or (isinstance(axis, (list, tuple)) and axis and all(isinstance(a, int) for a in axis))):
            raise TypeError(f"axis must be an int or a non-empty list/tuple of ints, got {axis!r}")
        if moving_variance_estimator not in _ESTIMATORS:
            raise ValueError(f"moving_variance_estimator must be one of {_ESTIMATORS}, got {moving_variance_estimator!r}")
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.center = bool(center)
        self.scale = bool(scale)
        for name, default in (("beta_initializer", "zeros"), ("gamma_initializer", "ones"),
                              ("moving_mean_initializer", "zeros"), ("moving_variance_initializer", "ones")):
            setattr(self, name, _initializers.get(getattr(self, name) or default))
        self.moving_variance_estimator = moving_variance_estimator
        self.track_running_stats = bool(track_running_stats)
        self.renorm = getattr(self, "renorm", False)  # set by the Keras face before this runs
        self.synchronized = False  # statistics over all processes (torch.distributed); see bnlab.convert_sync
        self.process_group = None
        self.virtual_batch_size = getattr(self, "virtual_batch_size", None)  # set by the Keras face
        self._trainable = True
        self._factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.feature_shape: tuple[int, ...] | None = None
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)
        self.register_buffer("num_batches_tracked", None)
        if self.renorm:
            for name in ("moving_stddev", "renorm_mean", "renorm_stddev"):
                self.register_buffer(name, None)
        shape = _as_shape(num_features)
        if shape is not None:
            self.build(shape)

    # ------------------------------------------------------------------ building

    @property
    def built(self) -> bool:
        return self.feature_shape is not None

    def build(self, feature_shape: Sequence[int], device=None) -> None:
        """Create the parameters and statistics for features of ``feature_shape``.

        Called by the first forward when ``num_features`` was not given. Build
        before creating an optimizer (pass ``num_features``, or run one batch):
        parameters created later are unknown to an existing optimizer.
        """
        shape = _as_shape(feature_shape)
        dev = device if device is not None else self._factory["device"]
        dt = self._factory["dtype"]
        self.feature_shape = shape
        if self.scale:
            self.weight = nn.Parameter(self.gamma_initializer(shape, dtype=dt, device=dev), requires_grad=self._trainable)
        if self.center:
            self.bias = nn.Parameter(self.beta_initializer(shape, dtype=dt, device=dev), requires_grad=self._trainable)
        if self.track_running_stats:
            # Statistics stay float32 even for half-precision models (Keras and PyTorch agree).
            stat_dtype = dt if dt in (torch.float32, torch.float64) else torch.float32
            self.running_mean = self.moving_mean_initializer(shape, dtype=stat_dtype, device=dev)
            self.running_var = self.moving_variance_initializer(shape, dtype=stat_dtype, device=dev)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=dev)
            if self.renorm:
                # Keras 3 tracks standard deviations for renorm, started at sqrt(initial variance).
                self.moving_stddev = torch.sqrt(self.running_var.clone())
                self.renorm_mean = self.running_mean.clone()
                self.renorm_stddev = torch.sqrt(self.running_var.clone())
        for name, t in (("gamma", self.weight), ("beta", self.bias), ("moving_mean", self.running_mean), ("moving_variance", self.running_var)):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} initializer returned shape {tuple(t.shape)}, expected {shape}")

    def reset_running_stats(self) -> None:
        if self.running_mean is not None:
            with torch.no_grad():
                shape, dt = self.feature_shape, self.running_mean.dtype
                self.running_mean.copy_(self.moving_mean_initializer(shape, dtype=dt))
                self.running_var.copy_(self.moving_variance_initializer(shape, dtype=dt))
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.copy_(self.gamma_initializer(self.feature_shape, dtype=self.weight.dtype))
            if self.bias is not None:
                self.bias.copy_(self.beta_initializer(self.feature_shape, dtype=self.bias.dtype))

    # ------------------------------------------------------------------ Keras-style access

    @property
    def gamma(self) -> nn.Parameter | None:
        """The scale (PyTorch key ``weight``); ``None`` when ``scale=False``."""
        return self.weight

    @property
    def beta(self) -> nn.Parameter | None:
        """The offset (PyTorch key ``bias``); ``None`` when ``center=False``."""
        return self.bias

    @property
    def moving_mean(self) -> Tensor | None:
        """The moving mean (PyTorch key ``running_mean``)."""
        return self.running_mean

    @property
    def moving_variance(self) -> Tensor | None:
        """The moving variance (PyTorch key ``running_var``)."""
        return self.running_var

    @property
    def trainable(self) -> bool:
        """Keras semantics: ``False`` freezes gamma and beta AND runs the layer in inference mode."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(self._trainable)

    def _weight_list(self) -> list[tuple[str, Tensor]]:
        pairs = [("gamma", self.weight), ("beta", self.bias), ("moving_mean", self.running_mean), ("moving_variance", self.running_var)]
        if self.renorm:
            pairs += [(n, getattr(self, n)) for n in ("moving_stddev", "renorm_mean", "renorm_stddev")]
        return [(n, t) for n, t in pairs if t is not None]

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies in Keras' order ``[gamma?, beta?, moving_mean, moving_variance]``."""
        self._require_built("get_weights")
        return [t.detach().cpu().numpy().copy() for _, t in self._weight_list()]

    def set_weights(self, weights: Sequence) -> None:
        """Set from arrays in Keras' order ``[gamma?, beta?, moving_mean, moving_variance]``."""
        self._require_built("set_weights")
        targets = self._weight_list()
        if len(weights) != len(targets):
            names = [n for n, _ in targets]
            raise ValueError(f"set_weights expected {len(targets)} arrays {names}, got {len(weights)}")
        for (name, t), w in zip(targets, weights, strict=True):
            arr = torch.as_tensor(np.asarray(w))
            if tuple(arr.shape) != tuple(t.shape):
                raise ValueError(f"set_weights: {name} expected shape {tuple(t.shape)}, got {tuple(arr.shape)}")
        with torch.no_grad():
            for (_, t), w in zip(targets, weights, strict=True):
                t.copy_(torch.as_tensor(np.asarray(w)).to(dtype=t.dtype, device=t.device))

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise RuntimeError(f"{type(self).__name__} is not built yet: pass num_features, call build(), or run one batch before {what}()")

    # ------------------------------------------------------------------ regularizers and constraints

    def regularization_losses(self) -> list[Tensor]:
        """The penalties of this layer's regularizers (see :func:`bnlab.regularization_loss`)."""
        out = []
        if self.gamma_regularizer is not None and self.weight is not None:
            out.append(self.gamma_regularizer(self.weight))
        if self.beta_regularizer is not None and self.bias is not None:
            out.append(self.beta_regularizer(self.bias))
        return out

    def apply_constraints_(self) -> None:
        """Project gamma and beta in place with their constraints (see :func:`bnlab.apply_constraints`)."""
        with torch.no_grad():
            if self.gamma_constraint is not None and self.weight is not None:
                self.weight.copy_(self.gamma_constraint(self.weight))
            if self.beta_constraint is not None and self.bias is not None:
                self.bias.copy_(self.beta_constraint(self.bias))

    # ------------------------------------------------------------------ forward

    def _old_weight(self):  # pragma: no cover - defined by each face
        raise NotImplementedError

    def _epsilon(self) -> float:  # pragma: no cover - defined by each face
        raise NotImplementedError

    def _momentum_epsilon(self) -> tuple:
        """``(weight of the old moving value or None, epsilon)`` in Keras' convention (each face overrides
        this with its own attributes: one call per batch instead of two)."""
        return self._old_weight(), self._epsilon()

    def _check_input(self, x: Tensor, mask: Tensor | None, training: bool) -> tuple[int, ...]:
        """The feature axes of ``x``, after checking it against the layer (built on its first batch)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        feat = F.normalize_axes(self.axis, x.ndim)
        built = self.feature_shape
        if built is not None and len(feat) == 1 and x.shape[feat[0]] == built[0]:
            return feat
        shape = tuple(x.shape[a] for a in feat)
        if built is None:
            self.build(shape, device=x.device)
        elif shape != built:
            want = built[0] if len(built) == 1 else built
            got = shape[0] if len(shape) == 1 else shape
            raise ValueError(f"{type(self).__name__}(axis={self.axis!r}) built for {want} features, "
                             f"got {got} (input shape {tuple(x.shape)})")
        return feat

    def forward(self, x: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        """Normalize ``x``; see the class docstring for the formulas.

        ``training=None`` follows the module's mode (``train()``/``eval()``).
        ``mask``: bool, broadcastable to ``x.shape`` without the feature axes;
        only True positions enter the training statistics, every position is
        normalized (inference checks the mask and ignores it).
        """
        training = (self.training if training is None else bool(training)) and self._trainable  # Keras: frozen = inference
        feat = self._check_input(x, mask, training)  # (builds a lazy layer)
        gamma, beta = self._parameters["weight"], self._parameters["bias"]
        mean, var = self._buffers["running_mean"], self._buffers["running_var"]
        momentum, eps = self._momentum_epsilon()
        act, slope = self._act, self._slope
        if not training and mean is not None:  # inference: the moving statistics (a mask is checked, unused)
            return F.batch_norm_inference(x, mean, var, gamma, beta, axis=feat, epsilon=eps, mask=mask,
                                          activation=act, negative_slope=slope)
        update = training and mean is not None  # else: batch statistics, nothing tracked
        if update and (self.renorm or self.virtual_batch_size):
            y = self._renorm_forward(x, feat, mask) if self.renorm else self._ghost_forward(x, feat, mask)
            return F.apply_activation(y, act, slope)
        if self.synchronized and _distributed(self.process_group):
            return F.apply_activation(self._sync_forward(x, feat, mask, update), act, slope)
        if not update:
            mean = var = None
        return F.batch_norm(x, mean, var, gamma, beta, training=True, axis=feat, momentum=momentum,
                            epsilon=eps, mask=mask, unbiased_moving_variance=self.moving_variance_estimator == "unbiased",
                            activation=act, negative_slope=slope,
                            num_batches_tracked=self._buffers["num_batches_tracked"] if update else None)

    def _sync_forward(self, x: Tensor, feat: tuple[int, ...], mask, update: bool) -> Tensor:
        """Training with statistics over all processes of ``process_group`` (exact merge)."""
        if mask is not None:
            raise ValueError("synchronized=True does not support masks")
        y, mean, var, count = F.sync_batch_norm_train(x, self.weight, self.bias, axis=feat, epsilon=self._epsilon(),
                                                      group=self.process_group)
        if update:
            unbiased = self.moving_variance_estimator == "unbiased"
            F.update_moving_stats_(self.running_mean, self.running_var, mean, var, self._old_weight(),
                                   count > (1 if unbiased else 0), num_batches_tracked=self.num_batches_tracked,
                                   variance_factor=F.variance_factor(count, "biased", self.moving_variance_estimator))
        return y

    def _ghost_forward(self, x: Tensor, feat: tuple[int, ...], mask) -> Tensor:
        """Training with ghost batches (``virtual_batch_size``; tf-keras' grouping)."""
        if mask is not None:
            raise ValueError("virtual_batch_size does not support masks")
        if x.numel() == 0:
            return F.batch_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, axis=feat,
                                          epsilon=self._epsilon())
        y, mean, var = F.ghost_batch_norm_train(x, self.weight, self.bias, axis=feat, epsilon=self._epsilon(),
                                                virtual_batch_size=self.virtual_batch_size)
        F.update_moving_stats_(self.running_mean, self.running_var, mean, var, self._old_weight(),
                               num_batches_tracked=self.num_batches_tracked)
        return y

    def _renorm_forward(self, x: Tensor, feat: tuple[int, ...], mask) -> Tensor:
        """Training with batch renormalization (Keras 3's semantics; see ``BatchNorm``'s ``renorm``)."""
        eps = self._epsilon()
        if x.numel() == 0:
            return F.batch_norm_inference(x, self.running_mean, self.running_var, self.weight, self.bias, axis=feat,
                                          epsilon=eps)
        self.num_batches_tracked.add_(1)
        with torch.no_grad():
            xd = x.detach()
            mean_b, var_b = F.moments(xd.float() if xd.dtype in (torch.float16, torch.bfloat16) else xd, feat, mask)
        step = self.num_batches_tracked
        clips = {k: (v(step) if callable(v) else v) for k, v in self.renorm_clipping.items()}
        r, d = F.renorm_correction(mean_b.reshape(-1), var_b.reshape(-1), self.renorm_mean.reshape(-1),
                                   self.renorm_stddev.reshape(-1), eps, clips.get("rmin"), clips.get("rmax"),
                                   clips.get("dmax"))
        g = None if self.weight is None else self.weight.reshape(-1)
        b = None if self.bias is None else self.bias.reshape(-1)
        g_eff = r if g is None else r * g  # (x_hat * r + d) * gamma + beta
        b_eff = d if g is None else d * g
        b_eff = b_eff if b is None else b_eff + b
        y = F.batch_norm(x, None, None, g_eff, b_eff, training=True, axis=feat, epsilon=eps, mask=mask)
        valid = None if mask is None else mask.any()
        F.update_renorm_stats_(self.running_mean, self.running_var, self.moving_stddev, self.renorm_mean,
                               self.renorm_stddev, torch.where(valid, mean_b, torch.nan) if valid is not None else mean_b,
                               var_b, eps, self.momentum, self.renorm_momentum)
        return y

    # ------------------------------------------------------------------ configuration

    def _config_dtype(self) -> str:
        """The dtype of the layer's parameters (or statistics) as it is now, else the one it was made for."""
        t = next((t for t in (self.weight, self.running_mean) if t is not None), None)
        return str(t.dtype if t is not None else self._factory["dtype"]).replace("torch.", "")

    def _feature_config(self):
        shape = self.feature_shape
        return None if shape is None else (shape[0] if len(shape) == 1 else list(shape))

    @classmethod
    def from_config(cls, config: dict):
        """The layer a :meth:`get_config` describes (Keras' ``from_config``), with weights made afresh.

        >>> import bnlab
        >>> layer = bnlab.BatchNorm(axis=1, momentum=0.9, epsilon=0.01, num_features=8)
        >>> twin = bnlab.BatchNorm.from_config(layer.get_config())
        >>> twin.get_config() == layer.get_config()
        True
        """
        config = dict(config)
        trainable = config.pop("trainable", True)
        if isinstance(config.get("dtype"), str):
            config["dtype"] = getattr(torch, config["dtype"])
        layer = cls(**config)
        layer.trainable = trainable
        return layer

    # ------------------------------------------------------------------ checkpoints

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed (PyTorch < 0.4.1 style), or a partial
            # dict (strict=False): the layer keeps its own count, as PyTorch's layers do.
            nbt = self._buffers.get("num_batches_tracked")
            state_dict[key] = nbt if nbt is not None else torch.tensor(0, dtype=torch.long)
        if not self.built:
            for name in ("running_mean", "weight", "bias"):
                if prefix + name in state_dict:
                    self.build(tuple(state_dict[prefix + name].shape))
                    break
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class BatchNorm(_BatchNormBase):
    r"""Batch normalization with the semantics of ``keras.layers.BatchNormalization``.

    **During training** (``training=True``, or ``None`` in ``train()`` mode), for
    each feature over every axis except ``axis`` (``M`` values)::

        mean = sum(x) / M
        var  = sum((x - mean)^2) / M                        # biased
        y    = gamma * (x - mean) / sqrt(var + epsilon) + beta
        moving_mean     <- momentum * moving_mean     + (1 - momentum) * mean
        moving_variance <- momentum * moving_variance + (1 - momentum) * var

    Gradients flow through ``mean`` and ``var``.

    **During inference** (``training=False``, or ``None`` in ``eval()`` mode)::

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta

    and nothing is updated.

    Args:
        axis (int or list of int, default ``-1``): the feature axis (axes) that
            are NOT reduced; gamma, beta and the moving statistics have their
            sizes, in increasing axis order. ``-1`` suits ``(N, C)`` and
            channels-last ``(N, H, W, C)``; use ``axis=1`` for ``(N, C, H, W)``.
        momentum (float, default ``0.99``): weight of the OLD moving value
            (Keras' convention; PyTorch's ``momentum=0.1`` is ``0.9`` here, see
            :func:`bnlab.conventions.keras_momentum_from_torch`). ``None`` keeps
            a cumulative average over all batches seen.
        epsilon (float, default ``1e-3``): added to the variance before the
            square root (PyTorch's default is ``1e-5``).
        center (bool, default ``True``): learn ``beta``; if False, ``beta`` is
            ``None`` and no offset is added.
        scale (bool, default ``True``): learn ``gamma``; if False, ``gamma`` is
            ``None`` (no scaling). Keras advises this when the next layer is
            linear (e.g. ReLU), as the next layer can absorb the scale.
        beta_initializer (default ``"zeros"``): how ``beta`` starts: a name
            (``"zeros"``, ``"ones"``), a :mod:`bnlab.initializers` instance such
            as ``Constant(0.9)`` or ``RandomNormal(0.0, 0.05)``, or a callable in
            either Keras' style ``fn(shape, dtype) -> Tensor`` or PyTorch's
            in-place style ``fn(tensor)`` (``torch.nn.init.ones_``,
            ``functools.partial(torch.nn.init.constant_, val=0.9)``);
            :func:`bnlab.initializers.get` says how the two are told apart.
        gamma_initializer (default ``"ones"``): how ``gamma`` starts; the same
            choices as ``beta_initializer``.
        moving_mean_initializer (default ``"zeros"``): how the moving mean
            starts; the same choices.
        moving_variance_initializer (default ``"ones"``): how the moving
            variance starts; the same choices.
        beta_regularizer (default ``None``): a :mod:`bnlab.regularizers`
            instance, name or callable; its penalty reaches the loss through
            :func:`bnlab.regularization_loss`.
        gamma_regularizer (default ``None``): the same for ``gamma``.
        beta_constraint (default ``None``): a :mod:`bnlab.constraints`
            instance, name or callable, applied after each optimizer step by
            :func:`bnlab.apply_constraints`.
        gamma_constraint (default ``None``): the same for ``gamma``.
        num_features (int or tuple, default ``None``): the feature size(s).
            ``None`` builds the layer lazily on the first input; build it before
            creating the optimizer (pass this, or run one batch).
        moving_variance_estimator (``"biased"`` (default) or ``"unbiased"``):
            what the moving variance averages. Keras stores the biased batch
            variance; ``"unbiased"`` stores ``var * M/(M-1)`` as PyTorch and the
            paper's Algorithm 2 do. The batch itself is always normalized with
            the biased variance.
        renorm (bool, default ``False``): batch renormalization (Ioffe, 2017,
            arXiv:1702.03275) with Keras 3's semantics: in training the batch
            is normalized, then corrected by ``x_hat * r + d`` with
            ``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma`` taken from
            separate renorm moving statistics (no gradient through them);
            inference uses ``moving_mean`` and ``moving_variance`` as usual,
            the latter derived from a tracked moving standard deviation.
            Adds the buffers ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``.
        renorm_clipping (dict, default none): ``{"rmax", "rmin", "dmax"}``
            clip ``r`` and ``d``; absent keys do not clip (as in Keras). A value
            may be a function of the training step (a tensor), e.g.
            :func:`bnlab.functional.renorm_ramp`, the paper's schedule.
        renorm_momentum (float, default ``0.99``): weight of the old value in
            the renorm statistics.
        virtual_batch_size (int, default ``None``): ghost batch normalization
            (Hoffer et al., 2017): in training, the batch (axis 0) is split into
            ``ceil(N / k)`` virtual batches, sample ``n`` in group
            ``n mod ceil(N / k)`` (tf-keras' grouping when ``k`` divides ``N``; an
            uneven batch gives groups of ``k`` and ``k - 1``, where tf-keras
            raises), each normalized with its own statistics; the moving
            statistics take the average of the groups' means and variances.
            Inference is unchanged.
        synchronized (bool, default ``False``): in training, compute the
            statistics over every process of ``torch.distributed`` (gloo on CPU,
            nccl on GPU) by an exact count-weighted merge, so each process
            normalizes as one process would normalize the concatenated batch;
            uneven and empty per-process batches work. Without an initialized
            process group of more than one process it is ordinary BN. Set
            ``layer.process_group`` to use a group other than the default.
        device (default ``None``): where parameters and statistics are created.
        dtype (default ``None``, torch's default dtype): the parameters'
            precision (statistics are float32 for half-precision parameters).

    **Conventions that differ from PyTorch.** ``training=None`` follows the
    module's ``train()``/``eval()`` mode (the PyTorch habit; in Keras ``None``
    means inference unless inside ``fit``). Setting ``layer.trainable = False``
    freezes gamma and beta *and* makes the layer run in inference mode even
    when called with ``training=True``: the Keras behaviour that fine-tuning
    relies on (PyTorch's ``requires_grad_(False)`` only stops gradients).

    **Edge cases.** A training batch with one value per feature normalizes to
    ``beta`` (variance 0), as in Keras; PyTorch raises instead. A feature whose
    batch statistics are not finite leaves its moving statistics unchanged (no
    NaN is ever written there). An empty batch and a fully masked batch update
    nothing and are normalized with the moving statistics. Half-precision inputs
    are computed in float32 and returned in their own dtype.

    Shape:
        Input: any rank containing ``axis``. Output: the same shape and memory
        layout (channels-last stays channels-last, without a copy).

    ``get_config()`` lists every constructor argument (initializers,
    regularizers and constraints in Keras' ``{"class_name", "config"}`` form)
    and ``BatchNorm.from_config(config)`` rebuilds the layer, as in Keras.

    State dict keys are PyTorch's (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so ``torch.nn.BatchNorm2d(C,
    eps=1e-3, momentum=0.01)`` checkpoints load into ``BatchNorm(axis=1,
    num_features=C)`` and back.

    Example::

        >>> import torch, bnlab
        >>> bn = bnlab.BatchNorm(num_features=3)          # axis=-1, momentum=0.99, epsilon=1e-3
        >>> x = torch.randn(64, 3) * 5 + 2
        >>> y = bn(x)                                      # train mode: batch statistics
        >>> bool(y.mean(0).abs().max() < 1e-5)            # normalized: zero mean per feature
        True
        >>> gamma, beta, mean, var = bn.get_weights()      # Keras' order
        >>> bool(torch.allclose(torch.as_tensor(mean), 0.01 * x.mean(0), atol=1e-6))
        True
    """

    def __init__(
        self,
        *,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        num_features: int | Sequence[int] | None = None,
        moving_variance_estimator: str = "biased",
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        synchronized: bool = False,
        device=None,
        dtype=None,
    ):
        _check_momentum(momentum, "weight of the old moving value")
        self.renorm = bool(renorm)
        self.renorm_clipping = _check_clipping(renorm_clipping) if renorm else None
        self.renorm_momentum = float(renorm_momentum)
        if renorm and (momentum is None or moving_variance_estimator != "biased"):
            raise ValueError("renorm=True needs a float momentum and the biased moving variance (Keras' renorm bookkeeping)")
        if virtual_batch_size is not None:
            if int(virtual_batch_size) < 1:
                raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
            if renorm or moving_variance_estimator != "biased":
                raise ValueError("virtual_batch_size cannot be combined with renorm or the unbiased moving variance")
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        sync = bool(synchronized)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.momentum = momentum
        self.epsilon = float(epsilon)
        self.beta_initializer, self.gamma_initializer = beta_initializer, gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        self.beta_regularizer = _regularizers.get(beta_regularizer)
        self.gamma_regularizer = _regularizers.get(gamma_regularizer)
        self.beta_constraint = _constraints.get(beta_constraint)
        self.gamma_constraint = _constraints.get(gamma_constraint)
        super().__init__(axis=axis, num_features=num_features, center=center, scale=scale,
                         moving_variance_estimator=moving_variance_estimator, device=device, dtype=dtype)
        self.synchronized = sync

    def _old_weight(self):
        return self.momentum

    def _epsilon(self) -> float:
        return self.epsilon

    def get_config(self) -> dict:
        """Every constructor argument, as Keras' ``get_config`` lists them (plus ``trainable``).

        Initializers, regularizers and constraints of bnlab's classes are written
        as Keras' ``{"class_name": ..., "config": {...}}``, so the config is JSON
        unless one of them (or a ``renorm_clipping`` schedule) is a plain
        function, which is kept as it is. ``num_features`` is the built size
        (``None`` before the first batch). :meth:`from_config` rebuilds the layer.
        """
        return {
            "axis": self.axis if isinstance(self.axis, int) else list(self.axis),
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": _initializers.serialize(self.beta_initializer),
            "gamma_initializer": _initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": _initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": _initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": _regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": _regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": _constraints.serialize(self.beta_constraint),
            "gamma_constraint": _constraints.serialize(self.gamma_constraint),
            "num_features": self._feature_config(),
            "moving_variance_estimator": self.moving_variance_estimator,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
            "synchronized": self.synchronized,
            "dtype": self._config_dtype(),
            "trainable": self.trainable,
        }

    def _momentum_epsilon(self) -> tuple:
        return self.momentum, self.epsilon

    def extra_repr(self) -> str:
        parts = [f"axis={self.axis!r}", f"momentum={self.momentum}", f"epsilon={self.epsilon}"]
        if self.built:
            parts.insert(0, f"num_features={self.feature_shape[0] if len(self.feature_shape) == 1 else self.feature_shape}")
        if not self.center:
            parts.append("center=False")
        if not self.scale:
            parts.append("scale=False")
        if self.moving_variance_estimator != "biased":
            parts.append(f"moving_variance_estimator={self.moving_variance_estimator!r}")
        if self.renorm:
            parts.append(f"renorm=True, renorm_momentum={self.renorm_momentum}")
        if self.virtual_batch_size:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        return ", ".join(parts)


BatchNormalization = BatchNorm
"""Keras' name for :class:`BatchNorm`, the same class (the tutorials use it)."""


def _check_clipping(clipping: dict | None) -> dict:
    clipping = dict(clipping or {})
    unknown = set(clipping) - {"rmax", "rmin", "dmax"}
    if unknown:
        raise ValueError(f"renorm_clipping takes the keys rmax, rmin, dmax; got {sorted(unknown)}")
    rmax, rmin, dmax = clipping.get("rmax"), clipping.get("rmin"), clipping.get("dmax")
    if isinstance(rmax, (int, float)) and isinstance(rmin, (int, float)) and rmax < rmin:
        raise ValueError(f"renorm_clipping needs rmax >= rmin, got rmax={rmax}, rmin={rmin}")
    if isinstance(dmax, (int, float)) and dmax < 0:
        raise ValueError(f"renorm_clipping needs dmax >= 0, got {dmax}")
    return clipping


class _TorchBatchNorm(_BatchNormBase):
    """PyTorch's face: ``torch.nn.BatchNorm*d`` arguments, defaults and semantics.

    Training normalizes with the biased batch variance and stores the UNBIASED
    one; ``running = (1 - momentum) * running + momentum * batch`` (momentum is
    the weight of the NEW value); ``momentum=None`` is a cumulative average.
    ``track_running_stats=False`` keeps no statistics and normalizes with the
    batch statistics in eval mode too. Outputs, gradients and running
    statistics match ``torch.nn.BatchNorm*d`` within float32 rounding.
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        _check_momentum(momentum, "weight of the new batch statistic")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        super().__init__(
            axis=1,
            num_features=num_features,
            center=affine,
            scale=affine,
            moving_variance_estimator="unbiased",
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )

    def _old_weight(self):
        return None if self.momentum is None else 1.0 - self.momentum

    def _epsilon(self) -> float:
        return self.eps

    def get_config(self) -> dict:
        """The constructor's arguments (PyTorch's names) plus ``dtype`` and ``trainable``; see
        :meth:`from_config`."""
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats, "dtype": self._config_dtype(),
                "trainable": self.trainable}

    def _momentum_epsilon(self) -> tuple:
        return (None if self.momentum is None else 1.0 - self.momentum), self.eps

    def _check_input(self, x, mask, training):
        if isinstance(x, Tensor) and x.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}D" for d in self._expected_dims) if len(self._expected_dims) < 5 else \
                f"at least {self._expected_dims[0]}D"
            raise ValueError(f"expected {dims} input (got {x.dim()}D input)")
        feat = super()._check_input(x, mask, training)
        if (training or self.running_mean is None) and x.numel() > 0 and x.numel() // x.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        return feat

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class BatchNormNd(_TorchBatchNorm):
    """PyTorch's semantics for any ``(N, C, ...)`` input (the rank-agnostic counterpart of
    ``torch.nn.SyncBatchNorm``'s single-process behaviour)."""

    _expected_dims = tuple(range(2, 33))


class BatchNorm1d(_TorchBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: input ``(N, C)`` or ``(N, C, L)``."""

    _expected_dims = (2, 3)


class BatchNorm2d(_TorchBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: input ``(N, C, H, W)``."""

    _expected_dims = (4,)


class BatchNorm3d(_TorchBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: input ``(N, C, D, H, W)``."""

    _expected_dims = (5,)

