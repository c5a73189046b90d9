import Foundation
import Testing
@testable import Tegra
import TestSupport

/// The real libusb code path (LibUSBTransport / LibUSBDeviceSource, through `provision tegra info`)
/// against a Jetson TK1 boot ROM emulated by umockdev: sysfs device + usbdevfs URB replay.
/// umockdev only answers an OUT URB whose bytes match the record exactly, so a passing run
/// proves the RCM message left libusb byte for byte as the spec's vector says.
@Suite struct LibUSBUmockdevTests {
    static let uid: [UInt8] = Array(0x10...0x1F)

    /// The `provision` executable built next to this test bundle.
    static var provisionBinary: String {
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
            .appendingPathComponent("provision").path
    }

    /// The opcode-0x6 v40 message written from the spec's facts alone (not by RCMMessage).
    static var specRCMVersionQuery: [UInt8] {
        var m = [UInt8](repeating: 0, count: 1028)
        func put(_ value: UInt32, _ offset: Int) { for i in 0..<4 { m[offset + i] = UInt8(value >> (8 * UInt32(i)) & 0xFF) } }
        put(1028, 0x000)
        put(0x6, 0x234)
        put(1028, 0x238)
        put(0x0040_0001, 0x240)
        m[0x274] = 0x80
        m[0x284] = 0x80
        let cmac = "01eb8a48e95c04388a2c2b877c76a8fe"
        for i in 0..<16 { m[0x104 + i] = UInt8(cmac.dropFirst(2 * i).prefix(2), radix: 16)! }
        return m
    }

    /// Device descriptor 0955:PRODUCT, one configuration, one vendor interface, bulk 0x81 IN / 0x01 OUT.
    static func descriptors(productID: UInt16) -> String {
        let id = String(format: "%02X%02X", productID & 0xFF, productID >> 8)
        return "1201000200000040" + "5509" + id + "0101010200010902200001010" + "0C0320904000002FFFFFF00"
            + "07058102000200" + "07050102000200"
    }

    static func deviceDescription(productID: UInt16) -> String {
        let descriptors = descriptors(productID: productID)
        return """
        P: /devices/pci0000:00/0000:00:14.0/usb1/1-3
        N: bus/usb/001/005=\(descriptors)
        E: BUSNUM=001
        E: DEVNAME=/dev/bus/usb/001/005
        E: DEVNUM=005
        E: DEVTYPE=usb_device
        E: DRIVER=usb
        E: SUBSYSTEM=usb
        A: bConfigurationValue=1\\n
        A: bNumConfigurations=1\\n
        A: busnum=1\\n
        H: descriptors=\(descriptors)
        A: dev=189:4\\n
        A: devnum=5\\n
        A: devpath=3\\n
        A: idProduct=\(String(format: "%04x", productID))\\n
        A: idVendor=0955\\n
        A: speed=480\\n

        """
    }

    /// URB tree: the boot ROM's UID (IN 0x81), then the host's message (OUT 0x01), then the reply.
    static func urbRecord(uid: [UInt8] = uid, message: [UInt8] = specRCMVersionQuery, reply: [UInt8]? = [0x01, 0x00, 0x40, 0x00]) -> String {
        var lines = ["USBDEVFS_REAPURBNDELAY 0 3 129 0 0 16 \(uid.count) 0 \(uid.hexString.uppercased())",
                     " USBDEVFS_REAPURBNDELAY 0 3 1 0 0 \(message.count) \(message.count) 0 \(message.hexString.uppercased())"]
        if let reply { lines.append("  USBDEVFS_REAPURBNDELAY 0 3 129 0 0 4 4 0 \(reply.hexString.uppercased())") }
        return lines.joined(separator: "\n") + "\n"
    }

    func runInfo(productID: UInt16 = 0x7140, record: String, extra: [String] = []) throws -> (status: Int32, stdout: String, stderr: String) {
        let directory = try TemporaryDirectory()
        let device = try directory.write("tegra.umockdev", Array(Self.deviceDescription(productID: productID).utf8))
        let ioctl = try directory.write("tegra.ioctl", Array(record.utf8))
        #expect(FileManager.default.isExecutableFile(atPath: Self.provisionBinary), "build the provision executable first")
        return try run("umockdev-run", ["-d", device, "-i", "/dev/bus/usb/001/005=\(ioctl)", "--",
                                        Self.provisionBinary, "tegra", "info", "--timeout-ms", "300"] + extra)
    }

    @Test func libusbReadsTheUIDAndRCMVersionOfAnEmulatedJetson() throws {
        let result = try runInfo(record: Self.urbRecord())
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("bus 1 device 5 (0955:7140"))
        #expect(result.stdout.contains("Tegra K1 (T124)"))
        #expect(result.stdout.contains("unit UID:     101112131415161718191a1b1c1d1e1f"))
        #expect(result.stdout.contains("RCM version:  64.1"))
    }

    @Test func libusbOpensTheDeviceByBusAndAddress() throws {
        let result = try runInfo(record: Self.urbRecord(), extra: ["--bus", "1", "--address", "5"])
        #expect(result.status == 0, "stderr: \(result.stderr)")
        #expect(result.stdout.contains("101112131415161718191a1b1c1d1e1f"))
    }

    @Test func aWrongBusAddressFindsNoDevice() throws {
        let result = try runInfo(record: Self.urbRecord(), extra: ["--bus", "1", "--address", "9"])
        #expect(result.status == 69)
        #expect(result.stderr.contains("no Tegra device in recovery mode found at bus 1 device 9"))
    }

    @Test func aRunningL4TSystemIsNotTakenForARecoveryDevice() throws {
        // 0955:7020 has the T20 low byte but is a running L4T, not a boot ROM.
        let result = try runInfo(productID: 0x7020, record: Self.urbRecord())
        #expect(result.status == 69)
        #expect(result.stderr.contains("looked for 0955:7820, 0955:7030, 0955:7330, 0955:7335, 0955:7140, 0955:7740"))
    }

    @Test func aMessageDifferingFromTheSpecInOneByteIsNotAccepted() throws {
        // Control for the test above: the replay really compares what libusb wrote.
        var message = Self.specRCMVersionQuery
        message[0x104] ^= 0x01
        let result = try runInfo(record: Self.urbRecord(message: message))
        #expect(result.status == 1)
        #expect(result.stderr.contains("failed to write 1028 bytes"))
    }

    @Test func aBootROMThatNeverRepliesIsAClearError() throws {
        let started = Date()
        let result = try runInfo(record: Self.urbRecord(reply: nil))
        #expect(result.status == 1)
        #expect(result.stderr.contains("bus 1 device 5") && result.stderr.contains("read"))
        #expect(Date().timeIntervalSince(started) < 10)
    }

    @Test func aTwelveByteUIDIsRefused() throws {
        let result = try runInfo(record: Self.urbRecord(uid: Array(1...12)))
        #expect(result.status == 1)
        #expect(result.stderr.contains("12-byte UID"))
    }
}

/// The libusb wrapper without a bus (this machine has no /dev/bus/usb) and its error texts.
@Suite struct LibUSBErrorTests {
    @Test func noDeviceIsAnErrorNamingTheIDsLookedFor() throws {
        let source = LibUSBDeviceSource(productIDs: [0x7140, 0x7740])
        let error = try #require(throws: TegraError.self) { try source.open() }
        #expect(error.kind == .noDevice)
        #expect(error.message.contains("no Tegra device in recovery mode found"))
        #expect(error.message.contains("0955:7140") || error.message.contains("USB bus"))
    }

    @Test func cliReportsNoDeviceWithExitCode69() throws {
        let result = try run(LibUSBUmockdevTests.provisionBinary, ["tegra", "info"])
        #expect(result.status == 69)
        #expect(result.stderr.contains("no Tegra device in recovery mode found"))
    }

    @Test func permissionErrorNamesTheUdevRuleAndGroup() {
        let error = LibUSB.error(-3, "open", location: "bus 1 device 5", node: "/dev/bus/usb/001/005")
        #expect(error.kind == .permissionDenied)
        #expect(error.message.contains("udev-rules/70-provision.rules") && error.message.contains("\"provision\""))
        #expect(error.message.contains("/dev/bus/usb/001/005"))
    }

    @Test func libusbCodesMapToActionableKinds() {
        #expect(LibUSB.error(-4, "read from", location: "x", node: nil).kind == .deviceGone)
        #expect(LibUSB.error(-7, "read from", location: "x", node: nil, timeoutMilliseconds: 1000).kind == .timeout)
        #expect(LibUSB.error(-6, "claim", location: "x", node: nil).message.contains("busy"))
        #expect(LibUSB.error(-1, "write", location: "x", node: nil).kind == .usb(-1))
    }

    @Test func reenumerationWaitGivesUpAfterItsTimeout() throws {
        let source = LibUSBDeviceSource(productIDs: [0x7140])
        let started = Date()
        let error = try #require(throws: TegraError.self) { try source.reopenAfterReenumeration(timeoutSeconds: 0.3) }
        #expect(error.kind == .reenumerationTimeout || error.kind == .noDevice)
        #expect(Date().timeIntervalSince(started) < 3)
    }
}
