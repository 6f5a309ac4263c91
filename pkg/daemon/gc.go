package daemon

import (
	"os"
	"runtime/debug"
)

// GC settings of tetherd: a context change allocates the agent's whole rule set a few times over
// (decoded grants, the compiled rule set, its kernel image), so at the default 100% the collector
// runs every few changes and a change that meets it waits. Collecting at 400% heap growth makes
// that rare; the soft limit brings the default pace back when the heap nears it.
const (
	gcPercent   = 400
	memoryLimit = 256 << 20
)

// TuneGC applies tetherd's GC settings, unless GOGC or GOMEMLIMIT set them. The benchmarks call
// it too, so that they measure what tetherd does.
func TuneGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(gcPercent)
	}
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set {
		debug.SetMemoryLimit(memoryLimit)
	}
}
