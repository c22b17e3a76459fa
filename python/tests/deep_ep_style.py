"""Code written for DeepEP V1's documented Python API, as frameworks call it (python.md section 2): it imports
`deep_ep` and knows nothing of nccl_moe. The tests run it unchanged on nccl_moe.deep_ep (through the alias) with world
size 1 over torch.distributed and with several ranks of a LocalWorld sharing one device.

Each function returns plain CPU tensors for the test to check against the reference.
"""
import torch


def make_buffer(group, *, hidden, num_experts, ll_tokens, low_latency_mode):
    import deep_ep

    num_ranks = group.size()
    nvl = 0
    # DeepEP's tuned tables start at 2 ranks (Megatron's sizing); a single rank sizes with the default Config.
    configs = ((deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks))
               if num_ranks > 1 else (deep_ep.Config(),))
    for config in configs:
        nvl = max(nvl, config.get_nvl_buffer_size_hint(hidden * 2, num_ranks))
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(ll_tokens, hidden, num_ranks, num_experts) \
        if low_latency_mode else 0
    return deep_ep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=low_latency_mode,
                          num_qps_per_rank=max(1, num_experts // num_ranks), explicitly_destroy=True)


def intranode_round(buffer, x, topk_idx, topk_weights, num_experts, *, async_mode, x2):
    """get_dispatch_layout -> dispatch -> (expert: identity) -> combine with weights -> cached dispatch."""
    from deep_ep import Buffer, EventOverlap
    from deep_ep.utils import EventHandle

    previous = EventOverlap(EventHandle()) if async_mode else None
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous, async_finish=async_mode,
                                   allocate_on_comm_stream=async_mode)
    assert num_tokens_per_rdma_rank is None
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, expert_alignment=1,
        config=Buffer.get_dispatch_config(buffer.group_size) if buffer.group_size > 1 else None,
        previous_event=event if async_mode else None, async_finish=async_mode,
        allocate_on_comm_stream=async_mode)
    if async_mode:
        assert event.event is not None
        event.current_stream_wait()
    else:
        assert event.event is None
    recv_src_idx = handle[3]
    out = dict(layout=(num_tokens_per_rank.cpu(), num_tokens_per_expert.cpu(), is_token_in_rank.cpu()),
               recv_x=recv_x.cpu(), recv_topk_idx=recv_topk_idx.cpu(), recv_topk_weights=recv_topk_weights.cpu(),
               per_expert=list(num_recv_tokens_per_expert_list), recv_src_idx=recv_src_idx.cpu())
    previous = Buffer.capture() if async_mode else None
    combined_x, combined_topk_weights, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights,
                                                              previous_event=previous, async_finish=async_mode,
                                                              allocate_on_comm_stream=async_mode)
    if async_mode:
        event.current_stream_wait()
    out["combined_x"] = combined_x.cpu()
    out["combined_topk_weights"] = combined_topk_weights.cpu()
    recv_x2, none_idx, none_w, none_list, none_handle, event = buffer.dispatch(x2, handle=handle)
    assert none_idx is None and none_w is None and none_list is None and none_handle is None
    out["cached_recv_x"] = recv_x2.cpu()
    return out


def fp8_round(buffer, x_fp8, x_scales, topk_idx, num_experts):
    """vLLM's HT path: x as a (fp8, scales) tuple; recv_x comes back as a tuple too, cached dispatch likewise."""
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    (recv_x, recv_x_scales), recv_topk_idx, recv_topk_weights, per_expert, handle, event = buffer.dispatch(
        x=(x_fp8, x_scales), handle=None, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=None, expert_alignment=1)
    assert recv_topk_weights is None and event.event is None
    (again, again_scales), *_ = buffer.dispatch((x_fp8, x_scales), handle=handle)
    return dict(recv_x=recv_x.cpu(), recv_x_scales=recv_x_scales.cpu(), again=again.cpu(),
                again_scales=again_scales.cpu(), per_expert=per_expert)


def worst_case_round(buffer, x, topk_idx, num_experts, num_worst_tokens):
    """Worst-case mode (no CPU sync): rows padded to num_worst_tokens, recv_topk_idx -1 past the real count."""
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx,
                                                                                                   num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(
        x, topk_idx=topk_idx, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, num_worst_tokens=num_worst_tokens)
    assert per_expert == [] and recv_topk_weights is None
    combined_x, _, _ = buffer.combine(recv_x, handle)
    return dict(recv_x=recv_x.cpu(), recv_topk_idx=recv_topk_idx.cpu(), combined_x=combined_x.cpu())


def low_latency_round(buffer, x, topk_idx, topk_weights, num_max_dispatch_tokens_per_rank, num_experts, *, use_fp8,
                      round_scale=False, use_ue8m0=False, hook_mode, zero_copy, expert):
    """low_latency_dispatch -> (hook) -> expert(rows) -> low_latency_combine (zero copy or out=) -> (hook)."""
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8, round_scale=round_scale,
        use_ue8m0=use_ue8m0, async_finish=not hook_mode, return_recv_hook=hook_mode)
    if hook_mode:
        hook()
    else:
        event.current_stream_wait()
    out = dict(recv_count=recv_count.cpu())
    # The handle's internals, as DeepEP code that reads them would (valid once recv_x is).
    src_info, layout_range, max_tokens, hidden, experts = handle
    assert handle[0] is src_info and handle[-4] is layout_range and handle[2:] == (max_tokens, hidden, experts)
    out["src_info"], out["layout_range"] = src_info.cpu(), layout_range.cpu()
    out["handle_scalars"] = (max_tokens, hidden, experts)
    if use_fp8:
        out["recv_x"], out["recv_x_scales"] = recv_x[0].cpu(), recv_x[1].cpu()
        out["scales_stride"] = recv_x[1].stride()
        out["scales_shape"] = tuple(recv_x[1].shape)
    else:
        out["recv_x"] = recv_x.cpu()
    y = expert(out, recv_x[0] if use_fp8 else recv_x)
    result = torch.empty((x.shape[0], x.shape[1]), dtype=torch.bfloat16, device=x.device)
    if zero_copy:
        buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
        combined_x, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle, zero_copy=True,
                                                             return_recv_hook=hook_mode, out=result)
    else:
        combined_x, event, hook = buffer.low_latency_combine(y, topk_idx, topk_weights, handle,
                                                             return_recv_hook=hook_mode, out=result)
    assert combined_x is result
    if hook_mode:
        hook()
    out["combined_x"] = combined_x.cpu()
    return out


def unsupported_arguments(buffer, x, topk_idx, num_experts, ll_tokens):
    """Each unsupported argument raises NotImplementedError naming it."""
    import deep_ep

    try:
        buffer.low_latency_dispatch(x, topk_idx, ll_tokens, num_experts, use_fp8=False,
                                    dispatch_wait_recv_cost_stats=torch.zeros(1))
    except NotImplementedError as e:
        assert "dispatch_wait_recv_cost_stats" in str(e)
    else:
        raise AssertionError("dispatch_wait_recv_cost_stats accepted")
    for name, call in (("get_local_buffer_tensor", lambda: buffer.get_local_buffer_tensor(torch.int8)),
                       ("use_fabric", lambda: deep_ep.Buffer(buffer.group, use_fabric=True))):
        try:
            call()
        except NotImplementedError as e:
            assert name in str(e), (name, str(e))
        else:
            raise AssertionError(f"{name} accepted")
    return True
