// Package version names the build: set Version with -ldflags "-X .../pkg/version.Version=v1.2.3",
// else the VCS revision Go recorded.
package version

import "runtime/debug"

// Version is set at link time by release builds.
var Version = ""

// String returns the version of this build.
func String() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return "dev-" + s.Value[:12]
			}
		}
	}
	return "dev"
}
