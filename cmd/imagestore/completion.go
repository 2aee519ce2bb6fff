package main

import (
	"context"
	"fmt"
	"strings"
)

// bashCompletion completes verbs, then each verb's flags (asked from the
// binary itself with "VERB -h", so they never go stale), then file names.
const bashCompletion = `# bash completion for imagestore: source it, or install it as
# /usr/share/bash-completion/completions/imagestore
_imagestore() {
    local cur verbs verb i flags
    cur="${COMP_WORDS[COMP_CWORD]}"
    verbs="%s"
    verb=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case " $verbs " in
        *" ${COMP_WORDS[i]} "*) verb="${COMP_WORDS[i]}"; break ;;
        esac
    done
    if [[ $cur == -* ]]; then
        flags=$("${COMP_WORDS[0]}" $verb -h 2>&1 | sed -n 's/^  \(-[A-Za-z0-9-]*\).*/\1/p')
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return
    fi
    if [[ -z $verb ]]; then
        COMPREPLY=($(compgen -W "$verbs" -- "$cur"))
        return
    fi
    COMPREPLY=($(compgen -f -- "$cur"))
}
complete -o filenames -F _imagestore imagestore
`

func cmdCompletion(_ context.Context, g *globals, args []string) error {
	fs := g.subFlags("completion")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "bash" {
		return usageErr("completion bash")
	}
	var verbs []string
	for _, c := range commandsOf(faceImagestore) {
		verbs = append(verbs, c.name)
	}
	_, err = fmt.Fprintf(g.stdout, bashCompletion, strings.Join(verbs, " "))
	return err
}
