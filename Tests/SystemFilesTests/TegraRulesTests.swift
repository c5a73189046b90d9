// The Tegra recovery-mode part of udev-rules/70-provision.rules, run through udev's rule
// engine on simulated USB devices, and checked against the facts of shared/tegra-rcm.md:
// the boot ROM's chip is told by the low byte of the product id (0x20 T20, 0x30 T30,
// 0x35 T114, 0x40 T124; 0x21 is T210, out of scope).

import Foundation
import Testing
import TestSupport

enum TegraFacts {
    /// tegra-rcm.md: the chip by the low byte of the product id.
    static let chipByLowByte: [UInt8: String] = [0x20: "T20", 0x30: "T30", 0x35: "T114", 0x40: "T124", 0x21: "T210"]
    static let supported: Set<String> = ["T20", "T30", "T114", "T124"]
    /// Recovery-mode product ids the rules must know (issue 3 names the first four).
    static let requiredProductIDs = ["7820", "7030", "7140", "7740"]
    /// NVIDIA ids that are a running system, not a boot ROM, although their low byte is a
    /// chip's: L4T running, initrd flashing mode, U-Boot DFU, and a generic Tegra device.
    static let notRecovery = ["7020", "7035", "701a", "7100"]
}

/// A USB device of vendor `vendor`, product `product` on root port 3.
func usbDevice(vendor: String, product: String) -> ([SimulatedDevice], String) {
    let path = "/devices/pci0000:00/0000:00:14.0/usb1/1-3"
    return ([
        SimulatedDevice(
            path: path, node: "bus/usb/001/005",
            properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb",
                         "DEVNAME": "/dev/bus/usb/001/005", "PRODUCT": "\(vendor)/\(product)/101",
                         "BUSNUM": "001", "DEVNUM": "005", "MAJOR": "189", "MINOR": "4"],
            attributes: ["idVendor": vendor, "idProduct": product, "bcdDevice": "0101", "busnum": "1",
                         "devnum": "5", "dev": "189:4", "manufacturer": "NVIDIA Corp.", "product": "APX"]),
        SimulatedDevice(path: "/devices/pci0000:00/0000:00:14.0/usb1",
                        properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb"],
                        attributes: ["idVendor": "1d6b", "idProduct": "0002"]),
        Storage.pci,
    ], path)
}

/// The product-id → chip assignments written in the rules (ATTR{idProduct}=="…", …CHIP="…").
func ruleAssignments(_ text: String) -> [String: String] {
    var result: [String: String] = [:]
    for line in text.split(separator: "\n") where line.hasPrefix("ATTR{idProduct}==") {
        let quoted = line.split(separator: "\"", omittingEmptySubsequences: false)
        // ATTR{idProduct}=="7140", ENV{PROVISION_TEGRA_CHIP}="T124", …
        if quoted.count >= 4 { result[String(quoted[1])] = String(quoted[3]) }
    }
    return result
}

/// The table in the rules file's comment: "#   7140       T124   T124    source".
func documentedTable(_ text: String) -> [String: String] {
    var result: [String: String] = [:]
    for line in text.split(separator: "\n") {
        let words = line.split(separator: " ")
        guard words.count >= 4, words[0] == "#", words[1].count == 4,
              words[1].allSatisfy(\.isHexDigit), words[2].hasPrefix("T") else { continue }
        result[String(words[1])] = String(words[3])
    }
    return result
}

@Suite("Tegra recovery devices in 70-provision.rules")
struct TegraRulesTests {
    let rulesText: String
    let gid: String

    init() throws {
        rulesText = try String(contentsOfFile: UdevRuleSimulator.rulesFile("70-provision.rules"), encoding: .utf8)
        gid = try provisionGroupID()
    }

    @Test func everyProductIDMapsToTheChipOfItsLowByte() throws {
        let assignments = ruleAssignments(rulesText)
        #expect(assignments.count >= 6)
        for (product, chip) in assignments {
            let low = try #require(UInt8(product.suffix(2), radix: 16))
            #expect(TegraFacts.chipByLowByte[low] == chip, "0955:\(product) is assigned \(chip)")
        }
    }

    @Test func theDocumentedTableMatchesTheRules() {
        #expect(documentedTable(rulesText) == ruleAssignments(rulesText))
    }

    @Test func knowsTheProductIDsTheIssueNames() {
        let assignments = ruleAssignments(rulesText)
        for product in TegraFacts.requiredProductIDs {
            #expect(assignments[product] != nil, "0955:\(product) missing")
        }
    }

    @Test(arguments: ["7820", "7030", "7330", "7335", "7140", "7740", "7321", "7721", "7f21"])
    func tagsABootROMInRecoveryMode(product: String) throws {
        let expectedChip = try #require(ruleAssignments(rulesText)[product])
        let (devices, path) = usbDevice(vendor: "0955", product: product)
        let result = try UdevRuleSimulator.simulate(devices, target: path, rules: try UdevRuleSimulator.projectRules())
        #expect(result.diagnostics.isEmpty, "udev complained: \(result.diagnostics)")
        #expect(result.currentTags.isSuperset(of: ["provision", "provision-tegra"]))
        #expect(result.properties["PROVISION_TEGRA_CHIP"] == expectedChip)
        #expect(result.properties["PROVISION_TEGRA_SUPPORTED"] == (TegraFacts.supported.contains(expectedChip) ? "1" : "0"))
        #expect(result.properties["PROVISION_SLOT_PATH"] == "pci-0000:00:14.0-usb-0:3")
        #expect(result.group == gid)
        #expect(result.mode == "0660")
    }

    @Test(arguments: TegraFacts.notRecovery)
    func leavesARunningNVIDIADeviceAlone(product: String) throws {
        let (devices, path) = usbDevice(vendor: "0955", product: product)
        let result = try UdevRuleSimulator.simulate(devices, target: path, rules: try UdevRuleSimulator.projectRules())
        #expect(!result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_TEGRA_CHIP"] == nil)
        #expect(result.group != gid)
    }

    @Test func leavesAnotherVendorWithARecoveryProductIDAlone() throws {
        let (devices, path) = usbDevice(vendor: "0bda", product: "7140")
        let result = try UdevRuleSimulator.simulate(devices, target: path, rules: try UdevRuleSimulator.projectRules())
        #expect(!result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_TEGRA_CHIP"] == nil)
    }

    @Test func ignoresTheRemovalOfABoard() throws {
        // On `remove` there is nothing to grant; the rules must not run path_id or set tags.
        let (devices, path) = usbDevice(vendor: "0955", product: "7140")
        let result = try UdevRuleSimulator.simulate(devices, target: path, action: "remove",
                                                    rules: try UdevRuleSimulator.projectRules())
        #expect(result.properties["PROVISION_TEGRA_CHIP"] == nil)
        #expect(!result.currentTags.contains("provision"))
    }
}
