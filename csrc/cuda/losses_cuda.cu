// The CUDA implementations of the fused_wloss operators: the host code of losses_host.h compiled
// by nvcc, registered for the CUDA dispatch key.
#include <torch/library.h>

#include "losses_host.h"

TORCH_LIBRARY_IMPL(fused_wloss, CUDA, m) {
  m.impl("cross_entropy_forward", &fused_wloss::cuda::host::cross_entropy_forward);
  m.impl("cross_entropy_backward", &fused_wloss::cuda::host::cross_entropy_backward);
  m.impl("cross_entropy_grad_", &fused_wloss::cuda::host::cross_entropy_grad_);
  m.impl("cross_entropy_prob_forward", &fused_wloss::cuda::host::cross_entropy_prob_forward);
  m.impl("cross_entropy_prob_backward", &fused_wloss::cuda::host::cross_entropy_prob_backward);
  m.impl("bce_forward", &fused_wloss::cuda::host::bce_forward);
  m.impl("bce_backward", &fused_wloss::cuda::host::bce_backward);
}
