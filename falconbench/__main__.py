from falconbench.cli import main

main()
