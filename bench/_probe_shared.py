import sys, torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, "bench")
import attention as A
import async_grpo.kv.shared_prefix as SP
q, kc, vc, ptab, plens, sg, stab, slens, ftab, flens = A.shared_prefix_case(4096, 16, "cuda")
layout = SP.GroupLayout.build(sg.tolist(), ptab.shape[0], "cuda")
f = lambda: SP.shared_prefix_decode_attention(q, kc, vc, ptab, plens, layout, stab, slens, 0.125)
for _ in range(5): f()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(20): f()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
for nw in (4,):
    SP.PREFIX_NUM_WARPS = nw
    print("PREFIX_NUM_WARPS", nw)
    A.run_shared_prefix(4096, 16, True)
