from avmp_triton.demo import main

main()
