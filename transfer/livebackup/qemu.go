package livebackup

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	"imagestore/transfer/qmp"
)

// bitmapInfo is one entry of a node's "dirty-bitmaps"; name is absent
// for QEMU's anonymous bitmaps while a job runs.
type bitmapInfo struct {
	Name         string `json:"name"`
	Count        int64  `json:"count"`
	Granularity  int64  `json:"granularity"`
	Recording    bool   `json:"recording"`
	Busy         bool   `json:"busy"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"`
}

// nodeInfo is the part of query-named-block-nodes the engine reads.
type nodeInfo struct {
	NodeName    string       `json:"node-name"`
	Drv         string       `json:"drv"`
	BackingFile string       `json:"backing_file"`
	Bitmaps     []bitmapInfo `json:"dirty-bitmaps"`
	File        string       `json:"file"`
	Image       struct {
		VirtualSize int64 `json:"virtual-size"`
		ActualSize  int64 `json:"actual-size"` // bytes the node's file occupies
	} `json:"image"`
}

type blockInfo struct {
	Device   string `json:"device"`
	QDev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
	} `json:"inserted"`
}

type jobInfo struct {
	ID              string `json:"id"`
	Type            string `json:"type"`
	Status          string `json:"status"`
	CurrentProgress int64  `json:"current-progress"`
	TotalProgress   int64  `json:"total-progress"`
	Error           string `json:"error"`
}

func namedNodes(ctx context.Context, m qmp.Monitor) ([]nodeInfo, error) {
	var nodes []nodeInfo
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return nil, err
	}
	return nodes, nil
}

func queryJobs(ctx context.Context, m qmp.Monitor) ([]jobInfo, error) {
	var jobs []jobInfo
	if err := m.Execute(ctx, "query-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	return jobs, nil
}

// ErrNoNode means NODE names no block node, device or disk alias of the VM.
var ErrNoNode = errors.New("no such drive")

// resolveNode maps the caller's NODE to the format node that carries the
// bitmaps: a node name, a query-block device, or "drive-<alias>" whose
// alias names the guest device (libvirt names nodes libvirt-N-format and
// devices <alias>).
func resolveNode(ctx context.Context, m qmp.Monitor, name string) (nodeInfo, error) {
	s, err := readBlockState(ctx, m)
	if err != nil {
		return nodeInfo{}, err
	}
	return s.resolve(ctx, name)
}

// blockState is one reading of the VM's block nodes, shared by the drives
// of a call so that resolving N drives asks QEMU once (twice when a name
// needs query-block), not N times.
type blockState struct {
	m      qmp.Monitor
	nodes  []nodeInfo
	blocks []blockInfo // read at the first name that is no node name
	read   bool
}

func readBlockState(ctx context.Context, m qmp.Monitor) (*blockState, error) {
	nodes, err := namedNodes(ctx, m)
	if err != nil {
		return nil, err
	}
	return &blockState{m: m, nodes: nodes}, nil
}

// chainBytes is the bytes n's image and its backing files occupy, as
// far as the chain's nodes are found by file name.
func (s *blockState) chainBytes(n nodeInfo) int64 {
	total := n.Image.ActualSize
	for depth := 0; n.BackingFile != "" && depth < 64; depth++ {
		i := slices.IndexFunc(s.nodes, func(x nodeInfo) bool { return x.Drv != "file" && x.File == n.BackingFile })
		if i < 0 {
			break
		}
		n = s.nodes[i]
		total += n.Image.ActualSize
	}
	return total
}

// resolve is resolveNode on this reading.
func (s *blockState) resolve(ctx context.Context, name string) (nodeInfo, error) {
	find := func(n string) (nodeInfo, bool) {
		for _, x := range s.nodes {
			if x.NodeName == n {
				return x, true
			}
		}
		return nodeInfo{}, false
	}
	if n, ok := find(name); ok {
		return n, nil
	}
	if !s.read {
		if err := s.m.Execute(ctx, "query-block", nil, &s.blocks); err != nil {
			return nodeInfo{}, err
		}
		s.read = true
	}
	alias := strings.TrimPrefix(name, "drive-")
	for _, want := range []func(b blockInfo) bool{
		func(b blockInfo) bool { return b.Device != "" && b.Device == name },
		func(b blockInfo) bool { return b.QDev == alias || strings.HasSuffix(b.QDev, "/"+alias) },
		func(b blockInfo) bool { return strings.HasPrefix(b.QDev, "/machine/peripheral/"+alias+"/") },
	} {
		for _, b := range s.blocks {
			if b.Inserted != nil && want(b) {
				if n, ok := find(b.Inserted.NodeName); ok {
					return n, nil
				}
			}
		}
	}
	return nodeInfo{}, fmt.Errorf("%w: %q", ErrNoNode, name)
}

// checkpoint is one of our persistent bitmaps "<BM>.<seq>".
type checkpoint struct {
	bitmapInfo
	seq int
}

// checkpoints lists prefix's checkpoints on n, oldest first.
func checkpoints(n nodeInfo, prefix string) []checkpoint {
	var cps []checkpoint
	for _, b := range n.Bitmaps {
		rest, ok := strings.CutPrefix(b.Name, prefix+".")
		if !ok {
			continue
		}
		seq, err := strconv.Atoi(rest)
		if err != nil || seq <= 0 {
			continue
		}
		cps = append(cps, checkpoint{b, seq})
	}
	sort.Slice(cps, func(i, j int) bool { return cps[i].seq < cps[j].seq })
	return cps
}

func tempBitmap(prefix string) string { return prefix + ".tmp" }

func hasBitmap(n nodeInfo, name string) bool {
	for _, b := range n.Bitmaps {
		if b.Name == name {
			return true
		}
	}
	return false
}

func removeBitmap(ctx context.Context, m qmp.Monitor, node, name string) error {
	return m.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": node, "name": name}, nil)
}

func isClass(err error, class string) bool {
	var qe *qmp.Error
	return errors.As(err, &qe) && qe.Class == class
}
