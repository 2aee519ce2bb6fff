// Command statecheck fails when the module holds package-level mutable
// state or registers anything from init(): every package-level var must be
// a sentinel error, a compiled regexp, a Prometheus descriptor or a blank
// interface assertion. Test files may keep package vars (flags, fixtures)
// but no init().
package main

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// allowedInit are the calls whose result may initialise a package var:
// values nobody mutates after the package loads.
var allowedInit = map[string]bool{
	"errors.New":         true,
	"fmt.Errorf":         true,
	"regexp.MustCompile": true,
	"prometheus.NewDesc": true,
}

func main() {
	root := "."
	if len(os.Args) > 1 {
		root = os.Args[1]
	}
	fset := token.NewFileSet()
	var problems []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		isTest := strings.HasSuffix(path, "_test.go")
		for _, decl := range f.Decls {
			switch d := decl.(type) {
			case *ast.FuncDecl:
				if d.Recv == nil && d.Name.Name == "init" {
					problems = append(problems, fmt.Sprintf("%s: func init(): build state in New, not at package load", fset.Position(d.Pos())))
				}
			case *ast.GenDecl:
				if d.Tok != token.VAR || isTest {
					continue
				}
				for _, spec := range d.Specs {
					vs := spec.(*ast.ValueSpec)
					for i, name := range vs.Names {
						if name.Name == "_" {
							continue
						}
						if i < len(vs.Values) && allowedValue(vs.Values[i]) {
							continue
						}
						problems = append(problems, fmt.Sprintf("%s: package-level var %s: mutable state belongs in a struct built by New (allowed: sentinel errors, compiled regexps, Prometheus descriptors)", fset.Position(name.Pos()), name.Name))
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "statecheck:", err)
		os.Exit(2)
	}
	for _, p := range problems {
		fmt.Println("statecheck:", p)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
}

func allowedValue(e ast.Expr) bool {
	call, ok := e.(*ast.CallExpr)
	if !ok {
		return false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return false
	}
	pkg, ok := sel.X.(*ast.Ident)
	return ok && allowedInit[pkg.Name+"."+sel.Sel.Name]
}
