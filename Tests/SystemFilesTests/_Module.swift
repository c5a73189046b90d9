// SystemFilesTests
