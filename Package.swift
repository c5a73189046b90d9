// swift-tools-version:6.1
// provision — a flash-and-provision appliance for lab benches.
// The target layout follows shared/DESIGN.md §1: dependencies point down,
// executables → Station/ControlProtocol → ImageIO/BlockDevices/Accounts/Tegra → C modules.
import PackageDescription

/// A Debian C library as a system library target: a module map, a shim header and pkg-config.
func systemLibrary(_ name: String, pkgConfig: String, apt: String) -> Target {
    .systemLibrary(name: name, path: "Sources/CModules/\(name)", pkgConfig: pkgConfig,
                   providers: [.apt([apt])])
}

let package = Package(
    name: "provision",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "provision", targets: ["provision"]),
        .executable(name: "provisiond", targets: ["provisiond"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"4.0.0"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        // The bench board's web server only (issue 19); no trait needs swift-configuration.
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        // Issue 18: the station's metrics in Prometheus' text format (brings swift-metrics 2.13.0).
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // Images over HTTP(S) (issue 17).
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        // Issue 18: the lab's shared ledger on PostgreSQL.
        .package(url: "https://github.com/vapor/postgres-nio", from: "1.33.2"),
    ],
    targets: [
        // C headers from Debian, nothing else.
        systemLibrary("CUdev", pkgConfig: "libudev", apt: "libudev-dev"),
        systemLibrary("CUSB", pkgConfig: "libusb-1.0", apt: "libusb-1.0-0-dev"),
        systemLibrary("CSystemd", pkgConfig: "libsystemd", apt: "libsystemd-dev"),
        systemLibrary("CExt2fs", pkgConfig: "ext2fs", apt: "libext2fs-dev"),
        systemLibrary("CCrypt", pkgConfig: "libcrypt", apt: "libcrypt-dev"),
        systemLibrary("CLZMA", pkgConfig: "liblzma", apt: "liblzma-dev"),
        systemLibrary("CZstd", pkgConfig: "libzstd", apt: "libzstd-dev"),
        systemLibrary("CZlib", pkgConfig: "zlib", apt: "zlib1g-dev"),
        // The long tail of image formats (bzip2, lz4, lzop, zip, tar), as Raspberry Pi Imager reads them.
        systemLibrary("CArchive", pkgConfig: "libarchive", apt: "libarchive-dev"),
        // What Glibc's Swift overlay cannot give: O_DIRECT, block ioctls, struct ucred,
        // non-variadic sd_notify helpers. Compiled with _GNU_SOURCE.
        .target(name: "ProvisionCShims", path: "Sources/CModules/ProvisionCShims",
                cSettings: [.define("_GNU_SOURCE")],
                linkerSettings: [.linkedLibrary("systemd")]),
        // The read-back fingerprint's vector loop (AVX2 chosen at run time).
        .target(name: "CFingerprint", path: "Sources/CModules/CFingerprint"),

        .target(name: "ImageIO", dependencies: [
            "CLZMA", "CZstd", "CZlib", "CArchive", "ProvisionCShims", "CFingerprint",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // Images over HTTP(S), streamed into ImageIO's write engine (issue 17).
        .target(name: "ImageHTTP", dependencies: [
            "ImageIO",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        .target(name: "BlockDevices", dependencies: [
            "CUdev", "ProvisionCShims",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        .target(name: "Accounts", dependencies: [
            "CExt2fs", "CCrypt", "ProvisionCShims",
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "TOMLKit", package: "TOMLKit"),
        ], exclude: ["INVENTORY.md"]),
        .target(name: "Tegra", dependencies: [
            "CUSB",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "_CryptoExtras", package: "swift-crypto"),
        ]),
        // One card, start to end: open and judge → write → verify → inject → check (issue 13).
        .target(name: "Pipeline", dependencies: [
            "ImageIO", "ImageHTTP", "BlockDevices", "Accounts", "ProvisionCShims",
        ]),
        .target(name: "ControlProtocol"),
        .target(name: "Station", dependencies: [
            "Pipeline", "ImageIO", "ImageHTTP", "BlockDevices", "Accounts", "Tegra", "ControlProtocol", "ProvisionCShims",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "TOMLKit", package: "TOMLKit"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "PostgresNIO", package: "postgres-nio"),
        ]),
        // The CLI's blocking client of the control socket; the board reuses it.
        .target(name: "ProvisionClient", dependencies: ["ControlProtocol"]),
        // `provision board`: the web page for the bench's screen, a read-only client (issue 19).
        .target(name: "Board", dependencies: [
            "ControlProtocol", "ProvisionClient",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "NIOCore", package: "swift-nio"),
        ], resources: [.embedInCode("Page/index.html"), .embedInCode("Page/board.css"), .embedInCode("Page/board.js")]),
        .executableTarget(name: "provisiond", dependencies: [
            "Station", "ControlProtocol", "BlockDevices", "CSystemd", "ProvisionCShims",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .executableTarget(name: "provision", dependencies: [
            "Pipeline", "ImageIO", "ImageHTTP", "BlockDevices", "Accounts", "Tegra", "Station", "ControlProtocol", "ProvisionClient", "Board",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // benchmarks/xzfill.sh's harness: one image cache fill, timed (issue 18).
        .executableTarget(name: "cache-fill-bench", dependencies: ["ImageIO"], path: "benchmarks/cache-fill-bench"),

        .target(name: "TestSupport", dependencies: [
            "ImageIO", "BlockDevices", "Tegra", "ProvisionCShims",
        ]),
        .testTarget(name: "ImageIOTests", dependencies: ["ImageIO", "BlockDevices", "TestSupport"]),
        .testTarget(name: "ImageHTTPTests", dependencies: ["ImageHTTP", "ImageIO", "Pipeline", "Station", "TestSupport"],
                    exclude: ["imageserver.py"]),
        .testTarget(name: "BlockDevicesTests", dependencies: ["BlockDevices", "TestSupport"]),
        .testTarget(name: "AccountsTests", dependencies: ["Accounts", "TestSupport"]),
        .testTarget(name: "TegraTests", dependencies: ["Tegra", "TestSupport"]),
        .testTarget(name: "StationTests", dependencies: ["Station", "Pipeline", "ImageIO", "BlockDevices", "TestSupport"]),
        .testTarget(name: "ImagesTests", dependencies: ["Station", "Accounts", "TestSupport"]),
        .testTarget(name: "SystemFilesTests", dependencies: ["BlockDevices", "TestSupport"]),
        .testTarget(name: "PipelineTests", dependencies: ["Pipeline", "ImageIO", "BlockDevices", "TestSupport", "ProvisionCShims"]),
        .testTarget(name: "IntegrationTests", dependencies: ["ControlProtocol", "Station", "TestSupport"]),
        .testTarget(name: "BoardTests", dependencies: ["Board", "ControlProtocol"]),
        // The daemon's own NIO handlers, on NIO's embedded channel.
        .testTarget(name: "ProvisiondTests", dependencies: [
            "provisiond",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
