package kernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// rootCgroupID is the id of every cgroup2 hierarchy's root.
const rootCgroupID = 1

func (k *Kernel) linkPath(name string) string { return filepath.Join(k.pinDir, "links", name) }

// adoptLink makes the pinned link at path run prog: a pinned link is updated in place (cgroup
// links) or replaced by a new one that is attached before the old one goes (tracing links), so
// enforcement never lapses. Without a pinned link it attaches a new one and pins it.
func (k *Kernel) adoptLink(path string, prog *ebpf.Program, attach func() (link.Link, error)) (link.Link, error) {
	old, err := link.LoadPinnedLink(path, nil)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		// Unusable (made by another build?): replaced below, after the new link runs.
		k.log.Warn("pinned link unusable, replacing it", "pin", path, "error", err)
		old = nil
	}
	if old != nil {
		if err := old.Update(prog); err == nil {
			return old, nil
		} else if !errors.Is(err, link.ErrNotSupported) && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
			old.Close()
			return nil, fmt.Errorf("updating pinned link %s: %w", path, err)
		}
	}
	l, err := attach()
	if err != nil {
		if old != nil {
			old.Close()
		}
		return nil, err
	}
	tmp := path + "_new" // bpffs refuses names with a dot
	os.Remove(tmp)
	if err := l.Pin(tmp); err != nil {
		l.Close()
		if old != nil {
			old.Close()
		}
		return nil, fmt.Errorf("pinning link %s: %w", tmp, err)
	}
	// The new link runs already; dropping the old pin and handle detaches the old one.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		k.log.Warn("unpinning replaced link", "pin", path, "error", err)
	}
	if old != nil {
		old.Close()
	}
	if err := l.Pin(path); err != nil {
		return l, fmt.Errorf("renaming link pin to %s: %w", path, err)
	}
	return l, nil
}

// attachGlobal attaches the tracing and LSM programs this load wants, then detaches pinned ones
// it does not: enforcement moves from one exec mode to the other without a gap.
func (k *Kernel) attachGlobal() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	var stale []hookSpec
	for _, h := range globalHooks() {
		path := k.linkPath(h.name)
		prog := k.coll.Programs[h.prog]
		if prog == nil {
			stale = append(stale, h)
			continue
		}
		attach := func() (link.Link, error) {
			if h.lsm {
				return link.AttachLSM(link.LSMOptions{Program: prog})
			}
			return link.AttachTracing(link.TracingOptions{Program: prog})
		}
		l, err := k.adoptLink(path, prog, attach)
		if err != nil {
			var ve *ebpf.VerifierError
			if errors.As(err, &ve) {
				return fmt.Errorf("attaching %s: %+v", h.section, ve)
			}
			return fmt.Errorf("attaching %s: %w", h.section, err)
		}
		k.global = append(k.global, l)
	}
	for _, h := range stale {
		if err := os.Remove(k.linkPath(h.name)); err == nil {
			k.log.Info("detached a link this exec mode does not use", "hook", h.name)
		}
	}
	return nil
}

// globalHooks are the tracing and LSM hooks, the LSM ones first: when they take over exec
// enforcement they run before the tracepoint program stops signalling.
func globalHooks() []hookSpec {
	var lsm, tracing []hookSpec
	for _, h := range hookSpecs {
		switch {
		case h.lsm:
			lsm = append(lsm, h)
		case !h.cgroup && !h.iter:
			tracing = append(tracing, h)
		}
	}
	return append(lsm, tracing...)
}

// AttachParent attaches the cgroup programs at the cgroup2 directory path, so that they run for
// every process below it. Calling it again for the same cgroup updates the links to the programs
// of this load. The cgroup2 root is refused unless Options.AllowRootAttach.
func (k *Kernel) AttachParent(path string) error {
	id, err := cgroupID(path)
	if err != nil {
		return err
	}
	if id == rootCgroupID && !k.opts.AllowRootAttach {
		return fmt.Errorf("refusing to attach at the cgroup2 root %s: it would hook every process of the host (set allow_root_attach to do it anyway)", path)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return errors.New("kernel closed")
	}
	var links []link.Link
	for _, h := range hookSpecs {
		if !h.cgroup {
			continue
		}
		pin := k.linkPath(fmt.Sprintf("cg-%d-%s", id, h.name))
		prog := k.coll.Programs[h.prog]
		if prog == nil {
			os.Remove(pin) // a hook this kernel (or this build) does not run here any more
			continue
		}
		l, err := k.adoptLink(pin, prog, func() (link.Link, error) {
			return link.AttachCgroup(link.CgroupOptions{Path: path, Attach: h.attach, Program: prog})
		})
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return fmt.Errorf("attaching %s at %s: %w", h.section, path, err)
		}
		links = append(links, l)
	}
	for _, l := range k.parents[id] {
		l.Close()
	}
	k.parents[id] = links
	if !slices.ContainsFunc(k.parentOrder, func(p parentCgroup) bool { return p.id == id }) {
		mount, err := cgroups.Mount()
		if err != nil {
			return err
		}
		level, err := cgroups.Level(mount, filepath.Clean(path))
		if err != nil {
			return err
		}
		k.parentOrder = append(k.parentOrder, parentCgroup{id: id, level: level, path: path})
	}
	return k.writeParents(false)
}

// parentCgroup is an agent parent as tether_parents holds it.
type parentCgroup struct {
	id    uint64
	level int
	path  string
}

// writeParents puts the agent parents into tether_parents, from index 0, and their count and
// shallowest level into tether_config: the global programs look there first. Until exact (the
// stale parents are known, DetachStaleParents), what an earlier tetherd recorded beyond them is
// kept: a restart attaches its parents one by one, and none may drop out meanwhile.
func (k *Kernel) writeParents(exact bool) error {
	if len(k.parentOrder) > dataplane.MaxParents {
		return fmt.Errorf("%d agent parents: the kernel holds %d", len(k.parentOrder), dataplane.MaxParents)
	}
	minLevel := 0
	for i, p := range k.parentOrder {
		fd, err := unix.Open(p.path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening agent parent %s: %w", p.path, err)
		}
		err = k.parentsMap.Put(uint32(i), uint32(fd))
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("recording agent parent %s: %w", p.path, err)
		}
		if i == 0 || p.level < minLevel {
			minLevel = p.level
		}
	}
	if !exact {
		return k.updateConfig("recording agent parents", func(c *bpfTetherConfigEntry) {
			if c.Parents == 0 || uint32(minLevel) < c.ParentLevel {
				c.ParentLevel = uint32(minLevel)
			}
			c.Parents = max(c.Parents, uint32(len(k.parentOrder)))
		})
	}
	if err := k.updateConfig("recording agent parents", func(c *bpfTetherConfigEntry) {
		c.Parents = uint32(len(k.parentOrder))
		c.ParentLevel = uint32(minLevel)
	}); err != nil {
		return err
	}
	for i := len(k.parentOrder); i < dataplane.MaxParents; i++ {
		if err := k.parentsMap.Delete(uint32(i)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clearing tether_parents[%d]: %w", i, err)
		}
	}
	return nil
}

// DetachStaleParents detaches the cgroup programs from every cgroup that has pinned links but is
// not in keep (cgroup ids), and returns the ids it detached.
func (k *Kernel) DetachStaleParents(keep map[uint64]bool) ([]uint64, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	entries, err := os.ReadDir(filepath.Join(k.pinDir, "links"))
	if err != nil {
		return nil, err
	}
	var gone []uint64
	var errs []error
	seen := map[uint64]bool{}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "cg-")
		if !ok {
			continue
		}
		idStr, _, _ := strings.Cut(rest, "-")
		id, err := strconv.ParseUint(idStr, 10, 64)
		if err != nil || keep[id] {
			continue
		}
		if err := os.Remove(k.linkPath(e.Name())); err != nil {
			errs = append(errs, err)
		}
		if !seen[id] {
			seen[id] = true
			gone = append(gone, id)
		}
		for _, l := range k.parents[id] {
			l.Close()
		}
		delete(k.parents, id)
	}
	k.parentOrder = slices.DeleteFunc(k.parentOrder, func(p parentCgroup) bool { return seen[p.id] })
	errs = append(errs, k.writeParents(true))
	return gone, errors.Join(errs...)
}

// cgroupID is the id of the cgroup2 directory at path: its inode number.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not a cgroup2 directory", path)
	}
	return st.Ino, nil
}

// Attached reports why enforcement is not in place, or nil when it is: the cgroup programs are
// attached at one agent parent at least, and every link this load attached is still pinned (a
// pin removed by hand or by `tetherd --remove-pins` detaches its program once tetherd lets go).
func (k *Kernel) Attached() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return errors.New("the BPF objects are closed")
	}
	if len(k.parents) == 0 {
		return errors.New("the cgroup programs are attached at no agent parent")
	}
	var pins []string
	for _, h := range hookSpecs {
		if k.coll.Programs[h.prog] == nil || h.iter {
			continue
		}
		if !h.cgroup {
			pins = append(pins, k.linkPath(h.name))
			continue
		}
		for id := range k.parents {
			pins = append(pins, k.linkPath(fmt.Sprintf("cg-%d-%s", id, h.name)))
		}
	}
	for _, p := range pins {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("link pin %s: %w", p, err)
		}
	}
	return nil
}
