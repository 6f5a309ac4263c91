// Command init is PID 1 of the test guest that `make test-vm` boots: it mounts what tether needs
// (proc, sys, devtmpfs, tmpfs, securityfs, tracefs, bpffs, cgroup2), loads the kernel modules the
// tests need, brings up loopback, runs the test binaries /vm/plan.json names, prints each one's
// exit status on the console and powers the guest off. The host reads the statuses: QEMU's own
// exit status says nothing about the guest.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// step is one test binary to run.
type step struct {
	Name string   `json:"name"`
	Bin  string   `json:"bin"`
	Args []string `json:"args"`
	Env  []string `json:"env"`
}

func main() {
	code := run()
	fmt.Printf("TETHER-VM-RESULT %d\n", code)
	os.Stdout.Sync()
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func run() int {
	mounts := []struct{ src, dst, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", ""},
		{"tmpfs", "/tmp", "tmpfs", "mode=1777"},
		{"tmpfs", "/run", "tmpfs", "mode=755"},
		{"securityfs", "/sys/kernel/security", "securityfs", ""},
		{"tracefs", "/sys/kernel/tracing", "tracefs", ""},
		{"bpf", "/sys/fs/bpf", "bpf", "mode=700"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", ""},
	}
	for _, m := range mounts {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, m.data); err != nil {
			fmt.Printf("TETHER-VM: mounting %s on %s: %v\n", m.fstype, m.dst, err)
			return 1
		}
	}
	mods, _ := filepath.Glob("/lib/modules/*.ko")
	for _, m := range mods {
		if err := loadModule(m); err != nil {
			fmt.Printf("TETHER-VM: loading %s: %v\n", m, err)
			return 1
		}
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		fmt.Printf("TETHER-VM: bringing up lo: %v\n", err)
		return 1
	}
	if b, err := os.ReadFile("/sys/kernel/security/lsm"); err == nil {
		fmt.Printf("TETHER-VM: kernel %s, active LSMs %s\n", uname(), strings.TrimSpace(string(b)))
	}

	b, err := os.ReadFile("/vm/plan.json")
	if err != nil {
		fmt.Printf("TETHER-VM: %v\n", err)
		return 1
	}
	var plan []step
	if err := json.Unmarshal(b, &plan); err != nil {
		fmt.Printf("TETHER-VM: plan: %v\n", err)
		return 1
	}
	worst := 0
	for _, s := range plan {
		start := time.Now()
		cmd := exec.Command(s.Bin, s.Args...)
		cmd.Dir = "/tmp"
		cmd.Env = append([]string{"PATH=/bin", "HOME=/tmp", "TMPDIR=/tmp"}, s.Env...)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
		err := cmd.Run()
		code := 0
		if err != nil {
			code = 1
			if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() > 0 {
				code = ee.ExitCode()
			}
		}
		fmt.Printf("TETHER-VM: %s exit %d (%s)\n", s.Name, code, time.Since(start).Round(time.Second))
		worst = max(worst, code)
	}
	return worst
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}

func uname() string {
	var u unix.Utsname
	unix.Uname(&u)
	return unix.ByteSliceToString(u.Release[:])
}
