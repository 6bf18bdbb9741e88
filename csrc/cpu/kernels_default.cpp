// The CPU kernels built for one instruction set (default); setup.py and the JIT loader compile this
// file with that set's CPU_CAPABILITY and -m flags (see fused_wloss/_build.py).
#include "kernels_impl.h"
