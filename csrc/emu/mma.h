// Emulation shim for the CPU check (see emu_cuda.h); never on a real build's include path.
#include "emu_cuda.h"
