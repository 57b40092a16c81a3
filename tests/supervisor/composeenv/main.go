// Prints, as JSON, the environment Docker Compose reads from an env_file (compose-go's own
// parser): tests/supervisor/test_env.py checks tpconf's dotenv export against it.
package main

import (
	"encoding/json"
	"os"

	"github.com/compose-spec/compose-go/v2/dotenv"
)

func main() {
	env, err := dotenv.GetEnvFromFile(map[string]string{}, []string{os.Args[1]})
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(env); err != nil {
		os.Exit(1)
	}
}
