"""Differentiable high-throughput dispatch and combine (torch.autograd.Function).

  - dispatch's backward is a combine of the gradients: grad_x[t] = sum over the ranks that received t of
    grad_recv_x[row of t] (exact: every received row is a copy of x[t]); grad_topk_weights[t, k] comes back the same
    way from the rank holding expert k (recv_topk_weights is 0.0 at non-local slots, a constant, so those gradients
    are dropped before the combine);
  - combine's backward is a cached dispatch: grad_x[row of t] = grad_combined_x[t]; biases get grad_combined_x.
    grad of combine's topk_weights is sent the same way, so it is exact at each row's local slots and 0.0 at the
    others (where the dispatch-produced weights that such a combine normally gets are 0.0 too).

Both are collective: every rank must run the backward pass through the same calls, in the same order. Which inputs
need gradients must therefore be the same on every rank (it is when the ranks run the same model).
Run on the current stream (no events); for overlap use Comm's methods directly.
"""
import torch

_BF16 = torch.bfloat16


class _Box:
    __slots__ = ("routing",)


class _HtDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, comm, topk_idx, box, expert_alignment, num_worst_tokens, num_sms):
        res = comm.ht_dispatch(x, topk_idx, topk_weights, expert_alignment=expert_alignment,
                               num_worst_tokens=num_worst_tokens, num_sms=num_sms)
        box.routing = res.routing
        ctx.comm = comm
        ctx.routing = res.routing
        ctx.num_sms = num_sms
        ctx.has_weights = topk_weights is not None
        ctx.save_for_backward(res.recv_topk_idx)
        ctx.mark_non_differentiable(res.recv_topk_idx)
        return res.recv_x, res.recv_topk_idx, res.recv_topk_weights

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_topk_idx, grad_recv_topk_weights):
        (recv_topk_idx,) = ctx.saved_tensors
        routing = ctx.routing
        if grad_recv_x is None:
            grad_recv_x = torch.zeros((routing.rows, ctx.comm.config.hidden), dtype=_BF16, device=recv_topk_idx.device)
        grad_w = None
        if ctx.has_weights and ctx.needs_input_grad[1]:
            if grad_recv_topk_weights is None:
                grad_w = torch.zeros(recv_topk_idx.shape, dtype=torch.float32, device=recv_topk_idx.device)
            else:
                grad_w = grad_recv_topk_weights.float().masked_fill(recv_topk_idx < 0, 0.0).contiguous()
        res = ctx.comm.ht_combine(grad_recv_x.to(_BF16).contiguous(), routing, topk_weights=grad_w,
                                  num_sms=ctx.num_sms)
        return res.combined_x, res.combined_topk_weights, None, None, None, None, None, None


class _HtCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, bias_0, bias_1, comm, routing, num_sms):
        bias = (bias_0, bias_1) if bias_1 is not None else bias_0
        res = comm.ht_combine(x, routing, topk_weights=topk_weights, bias=bias, num_sms=num_sms)
        ctx.comm = comm
        ctx.routing = routing
        ctx.num_sms = num_sms
        ctx.has_weights = topk_weights is not None
        ctx.bias_dtypes = (None if bias_0 is None else bias_0.dtype, None if bias_1 is None else bias_1.dtype)
        return res.combined_x, res.combined_topk_weights

    @staticmethod
    def backward(ctx, grad_combined_x, grad_combined_topk_weights):
        routing = ctx.routing
        T, H = routing.num_tokens, ctx.comm.config.hidden
        device = ctx.comm.device
        if grad_combined_x is None:
            grad_combined_x = torch.zeros((T, H), dtype=_BF16, device=device)
        grad_x = grad_w_in = None
        if ctx.needs_input_grad[0] or (ctx.has_weights and ctx.needs_input_grad[1]):
            w = None
            if ctx.has_weights and ctx.needs_input_grad[1]:
                w = (torch.zeros((T, routing.topk), dtype=torch.float32, device=device)
                     if grad_combined_topk_weights is None else grad_combined_topk_weights.float().contiguous())
            res = ctx.comm.ht_dispatch(grad_combined_x.to(_BF16).contiguous(), routing=routing, topk_weights=w,
                                       num_sms=ctx.num_sms)
            grad_x = res.recv_x if ctx.needs_input_grad[0] else None
            grad_w_in = res.recv_topk_weights
        grad_b0 = grad_combined_x.to(ctx.bias_dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_b1 = grad_combined_x.to(ctx.bias_dtypes[1]) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w_in, grad_b0, grad_b1, None, None, None


def dispatch(comm, x, topk_idx, topk_weights=None, *, expert_alignment=1, num_worst_tokens=0, num_sms=0):
    """Differentiable HT dispatch of bf16 x [T, H]: returns (recv_x, recv_topk_idx, recv_topk_weights, routing)."""
    box = _Box()
    recv_x, recv_topk_idx, recv_topk_weights = _HtDispatch.apply(
        x, topk_weights, comm, topk_idx, box, expert_alignment, num_worst_tokens, num_sms)
    return recv_x, recv_topk_idx, recv_topk_weights, box.routing


def combine(comm, x, routing, topk_weights=None, bias=None, *, num_sms=0):
    """Differentiable HT combine of bf16 x [rows, H]: returns (combined_x [T, H], combined_topk_weights or None)."""
    if isinstance(bias, (tuple, list)):
        bias_0, bias_1 = bias
    else:
        bias_0, bias_1 = bias, None
    return _HtCombine.apply(x, topk_weights, bias_0, bias_1, comm, routing, num_sms)
