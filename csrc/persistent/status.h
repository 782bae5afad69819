// Whether a persistent kernel failed (a CTA gave up waiting in its grid barrier): a word per device that
// the kernels set and the host reads lazily, at the next launch on that device or when asked
// (torch.ops.rnnext.check_persistent), so that no call waits for its kernel to finish.
#pragma once
#include <c10/util/Exception.h>

#include <mutex>
#include <vector>

namespace rnnext {
namespace persistent {

// Raises (once: the word is cleared) where word says a kernel failed.
inline void raise_if_failed(int* word) {
  auto* w = reinterpret_cast<volatile int*>(word);
  if (!w || *w == 0) return;
  *w = 0;
  TORCH_CHECK(false,
              "rnnext: a persistent kernel timed out in its grid barrier (a CTA waited more than 5 s for the others); "
              "the outputs of that call were filled with NaN. Please report it; rnnext.use_backend('step') avoids "
              "these kernels.");
}

// What check_persistent runs: each device kind's check (synchronize, then raise_if_failed), registered at
// load.
inline std::vector<void (*)()>& status_checks() {
  static std::vector<void (*)()> checks;
  return checks;
}
inline bool add_status_check(void (*check)()) {
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  status_checks().push_back(check);
  return true;
}

}  // namespace persistent
}  // namespace rnnext
