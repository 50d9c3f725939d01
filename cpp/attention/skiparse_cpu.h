// CPU kernel of the Skiparse permutations (pack, restore, switch, SSP exchange): one parallel row gather.
// Maps: cpp/include/difforge/skiparse_index.h.
#pragma once

#include "difforge/skiparse_index.h"

namespace difforge::skiparse {

void skiparse_gather_cpu(const GatherParams& p);

}  // namespace difforge::skiparse
