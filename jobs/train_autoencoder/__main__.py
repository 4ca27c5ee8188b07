from jobs.train_autoencoder.run import main

if __name__ == "__main__":
    main()
