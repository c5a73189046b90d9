// StationTests
