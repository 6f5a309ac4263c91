package kernel

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Root is dataplane.ContainerRoot: a container cgroup whose root a pod agent's exec rules are
// resolved in (tether_roots).
type Root = dataplane.ContainerRoot

// SetRoot records that the exec rules of the agent in slot are resolved in the root of the
// container cgroup cgroupID. It holds for that agent only: a new agent in the slot, or the cgroup
// bound anew, stops at its containers' first execs again.
func (k *Kernel) SetRoot(cgroupID uint64, r Root) error {
	if err := checkSlot(r.Slot); err != nil {
		return err
	}
	st := k.slot(r.Slot)
	st.mu.Lock()
	err := k.loadSlot(st, r.Slot)
	born := st.born
	st.mu.Unlock()
	switch {
	case err != nil:
		return err
	case born == 0:
		return fmt.Errorf("recording the root of container cgroup %d: slot %d has no agent", cgroupID, r.Slot)
	}
	v := bpfTetherRoot{Born: born, Slot: uint32(r.Slot), RootDev: r.Dir.Dev, RootIno: r.Dir.Ino}
	if err := k.roots.Update(cgroupID, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("recording the root of container cgroup %d of slot %d: %w", cgroupID, r.Slot, err)
	}
	return nil
}

// ForgetRoot removes the record of container cgroup cgroupID (gone: cgroup IDs are not reused).
func (k *Kernel) ForgetRoot(cgroupID uint64) error {
	if err := k.roots.Delete(cgroupID); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("removing the root of container cgroup %d: %w", cgroupID, err)
	}
	return nil
}

// Roots lists the container cgroups whose roots are resolved for the agents now in their slots.
func (k *Kernel) Roots() (map[uint64]Root, error) {
	out := map[uint64]Root{}
	var id uint64
	var v bpfTetherRoot
	it := k.roots.Iterate()
	for it.Next(&id, &v) {
		st := k.slot(dataplane.Slot(v.Slot))
		st.mu.Lock()
		err := k.loadSlot(st, dataplane.Slot(v.Slot))
		born := st.born
		st.mu.Unlock()
		if err == nil && born != 0 && born == v.Born {
			out[id] = Root{Slot: dataplane.Slot(v.Slot), Dir: dataplane.FileID{Dev: v.RootDev, Ino: v.RootIno}}
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("listing container roots: %w", err)
	}
	return out, nil
}

// forgetRootsOf removes the container roots recorded for slot's agents (the slot is cleared).
func (k *Kernel) forgetRootsOf(slot dataplane.Slot) error {
	var ids []uint64
	var id uint64
	var v bpfTetherRoot
	it := k.roots.Iterate()
	for it.Next(&id, &v) {
		if dataplane.Slot(v.Slot) == slot {
			ids = append(ids, id)
		}
	}
	errs := []error{it.Err()}
	for _, id := range ids {
		errs = append(errs, k.ForgetRoot(id))
	}
	return errors.Join(errs...)
}
