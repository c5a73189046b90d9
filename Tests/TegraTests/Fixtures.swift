import Foundation
import Tegra
import TestSupport

/// Runs a peer tool and returns its stdout; a failure is a thrown error with its stderr.
func run(_ tool: String, _ arguments: [String], stdin: [UInt8]? = nil) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = [tool] + arguments
    let out = Pipe(), err = Pipe(), input = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = input
    try process.run()
    if let stdin { input.fileHandleForWriting.write(Data(stdin)) }
    try input.fileHandleForWriting.close()
    let stdout = out.fileHandleForReading.readDataToEndOfFile()
    let stderr = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
}

struct ToolFailed: Error, CustomStringConvertible {
    let description: String
}

/// Compiles device tree source with dtc into a DTB (the Debian device-tree-compiler).
func compileDTS(_ source: String, in directory: TemporaryDirectory, name: String = "test") throws -> [UInt8] {
    let dts = try directory.write(name + ".dts", Array(source.utf8))
    let dtb = directory.file(name + ".dtb")
    let result = try run("dtc", ["-I", "dts", "-O", "dtb", "-o", dtb, dts])
    guard result.status == 0 else { throw ToolFailed(description: "dtc: \(result.stderr)") }
    return [UInt8](try Data(contentsOf: URL(fileURLWithPath: dtb)))
}

/// Deterministic filler bytes (a synthetic stand-in for NVIDIA's blobs and U-Boot).
func pattern(_ count: Int, seed: UInt32) -> [UInt8] {
    var state = seed &* 2_654_435_761 | 1
    return (0..<count).map { _ in
        state ^= state << 13; state ^= state >> 17; state ^= state << 5
        return UInt8(truncatingIfNeeded: state)
    }
}

let ubootDTS = """
/dts-v1/;
/memreserve/ 0x80000000 0x1000;
/ {
    model = "NVIDIA Jetson TK1";
    compatible = "nvidia,jetson-tk1", "nvidia,tegra124";
    #address-cells = <1>;
    #size-cells = <1>;
    chosen { stdout-path = "serial0:115200n8"; };
    memory@80000000 { device_type = "memory"; reg = <0x80000000 0x80000000>; };
};
"""

/// Synthetic T124 inputs of the real sizes (miniloader 136,920 bytes, BCT 8192).
func syntheticInputs(in directory: TemporaryDirectory, environment: [(name: String, value: String)] = [("hostname", "{unit}"), ("unit_uid", "{uid}")],
                     unitName: String? = "bench-07") throws -> TegraFlashInputs {
    TegraFlashInputs(chip: .t124, usbProductIDs: [0x7140, 0x7740], miniloader: pattern(136_920, seed: 1),
                     miniloaderEntry: 0x4000_E000, bct: try ReferenceBCT.make(in: directory),
                     ubootNoDTB: pattern(300_001, seed: 3), ubootDTB: try compileDTS(ubootDTS, in: directory),
                     ubootBSSSize: 0x3_1234, loadAddress: 0x8010_8000, ramBase: 0x8000_0000,
                     environment: environment, unitName: unitName)
}
