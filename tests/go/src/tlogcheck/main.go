// tlogcheck checks meshca's audit log, checkpoints and proofs with Go's
// golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog: an implementation
// of signed notes and RFC 6962 trees that meshca does not share code with.
// tests/transparency.rs builds it offline in GOPATH mode and runs it.
//
//	tlogcheck tree VKEYFILE LOGFILE CHECKPOINTFILE   the checkpoint opens with the key and its root is the log's tree at its size
//	tlogcheck inclusion VKEYFILE PROOF.json          `meshca audit prove --serial` output checks under its checkpoint
//	tlogcheck consistency VKEYFILE PROOF.json        `meshca audit prove --checkpoint` output checks between its checkpoints
//
// Exit 0 and "ok ..." when it checks; exit 1 and the reason otherwise.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tlogcheck: "+format+"\n", args...)
	os.Exit(1)
}

func read(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	return data
}

type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

// open verifies the signed note with the verifier key and parses the C2SP tlog-checkpoint body.
func open(vkey string, msg []byte) checkpoint {
	verifier, err := note.NewVerifier(strings.TrimSpace(vkey))
	if err != nil {
		fail("verifier key: %v", err)
	}
	n, err := note.Open(msg, note.VerifierList(verifier))
	if err != nil {
		fail("checkpoint: %v", err)
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) < 4 {
		fail("checkpoint: want origin, size and root lines, got %q", n.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 {
		fail("checkpoint: bad size %q", lines[1])
	}
	root := hash(lines[2])
	return checkpoint{origin: lines[0], size: size, root: root}
}

func hash(b64 string) tlog.Hash {
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) != tlog.HashSize {
		fail("bad hash %q", b64)
	}
	var h tlog.Hash
	copy(h[:], raw)
	return h
}

func hashes(list []string) []tlog.Hash {
	out := make([]tlog.Hash, len(list))
	for i, s := range list {
		out[i] = hash(s)
	}
	return out
}

// treeOf computes the tree hash of the first n lines of the log, as tlog stores it.
func treeOf(lines [][]byte, n int64) tlog.Hash {
	var stored []tlog.Hash
	reader := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			out[i] = stored[x]
		}
		return out, nil
	})
	for i := int64(0); i < n; i++ {
		hs, err := tlog.StoredHashes(i, lines[i], reader)
		if err != nil {
			fail("%v", err)
		}
		stored = append(stored, hs...)
	}
	root, err := tlog.TreeHash(n, reader)
	if err != nil {
		fail("%v", err)
	}
	return root
}

func main() {
	if len(os.Args) < 4 {
		fail("usage: tlogcheck tree|inclusion|consistency VKEYFILE ...")
	}
	vkey := string(read(os.Args[2]))
	switch os.Args[1] {
	case "tree":
		if len(os.Args) != 5 {
			fail("usage: tlogcheck tree VKEYFILE LOGFILE CHECKPOINTFILE")
		}
		log := read(os.Args[3])
		cp := open(vkey, read(os.Args[4]))
		lines := bytes.Split(log, []byte("\n"))
		complete := int64(len(lines) - 1) // the text after the last line feed is not a record
		if cp.size > complete {
			fail("checkpoint signs %d records, the log has %d", cp.size, complete)
		}
		if got := treeOf(lines, cp.size); got != cp.root {
			fail("the log's tree at %d records is %v, the checkpoint signs %v", cp.size, got, cp.root)
		}
		fmt.Printf("ok tree %s %d\n", cp.origin, cp.size)
	case "inclusion":
		var p struct {
			Index      int64    `json:"log_index"`
			Record     string   `json:"record"`
			Proof      []string `json:"inclusion_proof"`
			Checkpoint string   `json:"checkpoint"`
		}
		if err := json.Unmarshal(read(os.Args[3]), &p); err != nil {
			fail("%v", err)
		}
		cp := open(vkey, []byte(p.Checkpoint))
		leaf := tlog.RecordHash([]byte(p.Record))
		if err := tlog.CheckRecord(tlog.RecordProof(hashes(p.Proof)), cp.size, cp.root, p.Index, leaf); err != nil {
			fail("inclusion of record %d in %d: %v", p.Index, cp.size, err)
		}
		fmt.Printf("ok inclusion %d %d\n", p.Index, cp.size)
	case "consistency":
		var p struct {
			Proof []string `json:"consistency_proof"`
			Old   string   `json:"old_checkpoint"`
			New   string   `json:"checkpoint"`
		}
		if err := json.Unmarshal(read(os.Args[3]), &p); err != nil {
			fail("%v", err)
		}
		old, cur := open(vkey, []byte(p.Old)), open(vkey, []byte(p.New))
		if old.origin != cur.origin {
			fail("origins differ: %q, %q", old.origin, cur.origin)
		}
		if err := tlog.CheckTree(tlog.TreeProof(hashes(p.Proof)), cur.size, cur.root, old.size, old.root); err != nil {
			fail("consistency %d → %d: %v", old.size, cur.size, err)
		}
		fmt.Printf("ok consistency %d %d\n", old.size, cur.size)
	default:
		fail("unknown check %q", os.Args[1])
	}
}
