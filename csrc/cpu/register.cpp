// The CPU's kernels of every op (driver/register.h over cpu/launcher.h) and the emulation's status check.
#include "cpu/launcher.h"
#include "driver/register.h"

namespace rnnext {

TORCH_LIBRARY_IMPL(rnnext, CPU, m) { register_ops<CpuLauncher>(m); }

static const bool emulation_status_added = persistent::add_status_check(&emulated::check);

}  // namespace rnnext
