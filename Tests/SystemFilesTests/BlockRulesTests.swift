// udev-rules/70-provision.rules on block devices this machine does not have, through udev's
// own rule engine (see UdevRuleSimulator). Each refusal case is a disk that an appliance
// writing automatically must never be offered.

import Foundation
import Testing
import TestSupport

/// Fake sysfs trees for the storage devices a bench meets.
enum Storage {
    static let pci = SimulatedDevice(
        path: "/devices/pci0000:00/0000:00:14.0",
        properties: ["SUBSYSTEM": "pci", "DRIVER": "xhci_hcd", "PCI_SLOT_NAME": "0000:00:14.0"])

    /// LUN `lun` of a multi-slot USB card reader on hub port 1.1; returns (devices, disk path).
    static func usbDisk(removable: Bool, lun: Int = 2, kernelName: String = "sdd", partition: Int? = nil)
        -> ([SimulatedDevice], String)
    {
        let usb = "/devices/pci0000:00/0000:00:14.0/usb1"
        let interface = "\(usb)/1-1/1-1.1/1-1.1:1.0"
        let scsi = "\(interface)/host6/target6:0:0/6:0:0:\(lun)"
        let disk = "\(scsi)/block/\(kernelName)"
        var devices = [
            SimulatedDevice(
                path: disk, node: kernelName,
                properties: ["SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/\(kernelName)",
                             "MAJOR": "8", "MINOR": "48"],
                attributes: ["removable": removable ? "1" : "0", "size": "62333952", "ro": "0", "dev": "8:48"]),
            SimulatedDevice(
                path: scsi, properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_device", "DRIVER": "sd"],
                attributes: ["type": "0", "vendor": "Generic-", "model": "SD/MMC/MS PRO", "rev": "1.00"]),
            SimulatedDevice(path: "\(interface)/host6/target6:0:0", properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_target"]),
            SimulatedDevice(path: "\(interface)/host6", properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_host"]),
            SimulatedDevice(
                path: interface, properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_interface", "DRIVER": "usb-storage"],
                attributes: ["bInterfaceClass": "08", "bInterfaceSubClass": "06", "bInterfaceProtocol": "50",
                             "bInterfaceNumber": "00"]),
            SimulatedDevice(
                path: "\(usb)/1-1/1-1.1", properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb"],
                attributes: ["idVendor": "0bda", "idProduct": "0307", "serial": "201006010301",
                             "manufacturer": "Generic", "product": "USB3.0 Card Reader"]),
            SimulatedDevice(
                path: "\(usb)/1-1", properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb"],
                attributes: ["idVendor": "05e3", "idProduct": "0610"]),
            SimulatedDevice(
                path: usb, properties: ["SUBSYSTEM": "usb", "DEVTYPE": "usb_device", "DRIVER": "usb"],
                attributes: ["idVendor": "1d6b", "idProduct": "0002"]),
            pci,
        ]
        guard let partition else { return (devices, disk) }
        let part = "\(disk)/\(kernelName)\(partition)"
        devices.insert(
            SimulatedDevice(
                path: part, node: "\(kernelName)\(partition)",
                properties: ["SUBSYSTEM": "block", "DEVTYPE": "partition", "DEVNAME": "/dev/\(kernelName)\(partition)",
                             "PARTN": "\(partition)", "MAJOR": "8", "MINOR": "\(48 + partition)"],
                attributes: ["partition": "\(partition)", "start": "8192", "size": "524288", "dev": "8:\(48 + partition)"]),
            at: 0)
        return (devices, part)
    }

    /// A SATA disk on an AHCI controller (the kind of disk that holds `/`).
    static func sataDisk(removable: Bool) -> ([SimulatedDevice], String) {
        let ahci = "/devices/pci0000:00/0000:00:17.0"
        let scsi = "\(ahci)/ata1/host0/target0:0:0/0:0:0:0"
        let disk = "\(scsi)/block/sda"
        return ([
            SimulatedDevice(
                path: disk, node: "sda",
                properties: ["SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/sda", "MAJOR": "8", "MINOR": "0"],
                attributes: ["removable": removable ? "1" : "0", "size": "1000215216", "ro": "0", "dev": "8:0"]),
            SimulatedDevice(path: scsi, properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_device", "DRIVER": "sd"],
                            attributes: ["type": "0", "vendor": "ATA", "model": "Samsung SSD 870"]),
            SimulatedDevice(path: "\(ahci)/ata1/host0/target0:0:0", properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_target"]),
            SimulatedDevice(path: "\(ahci)/ata1/host0", properties: ["SUBSYSTEM": "scsi", "DEVTYPE": "scsi_host"]),
            SimulatedDevice(path: "\(ahci)/ata1", properties: ["SUBSYSTEM": "ata_port"]),
            SimulatedDevice(path: ahci, properties: ["SUBSYSTEM": "pci", "DRIVER": "ahci", "PCI_SLOT_NAME": "0000:00:17.0"]),
        ], disk)
    }

    /// A card on an SD host controller: `type` is "SD" for an SD card, "MMC" for soldered
    /// eMMC. `disk` may be mmcblk0, mmcblk0boot0 (an eMMC boot area) or mmcblk0p1.
    static func mmc(type: String, disk name: String = "mmcblk0", behindPlatformDevice: Bool = false)
        -> ([SimulatedDevice], String)
    {
        // sdhci-pci puts the host right under the PCI device; a Raspberry Pi's host sits
        // under a platform device, which path_id counts as a transport.
        let controller = behindPlatformDevice
            ? "/devices/platform/emmc2bus/fe340000.mmc" : "/devices/pci0000:00/0000:00:1e.6"
        let host = "\(controller)/mmc_host/mmc0"
        let card = "\(host)/mmc0:aaaa"
        let isPartition = name.contains("p") && !name.contains("boot")
        let diskPath = "\(card)/block/mmcblk0"
        let path = name == "mmcblk0" ? diskPath : isPartition ? "\(diskPath)/\(name)" : "\(card)/block/\(name)"
        var devices = [
            SimulatedDevice(
                path: path, node: name,
                properties: ["SUBSYSTEM": "block", "DEVTYPE": isPartition ? "partition" : "disk",
                             "DEVNAME": "/dev/\(name)", "MAJOR": "179", "MINOR": "0"],
                attributes: ["removable": "0", "size": "62333952", "ro": "0", "dev": "179:0"]),
            SimulatedDevice(
                path: card, properties: ["SUBSYSTEM": "mmc", "DRIVER": "mmcblk", "MMC_TYPE": type],
                attributes: ["type": type, "name": "SC32G", "serial": "0x1234abcd"]),
            SimulatedDevice(path: host, properties: ["SUBSYSTEM": "mmc_host"]),
            behindPlatformDevice
                ? SimulatedDevice(path: controller, properties: ["SUBSYSTEM": "platform", "DRIVER": "sdhci-iproc"])
                : SimulatedDevice(path: controller,
                                  properties: ["SUBSYSTEM": "pci", "DRIVER": "sdhci-pci", "PCI_SLOT_NAME": "0000:00:1e.6"]),
        ]
        if behindPlatformDevice {
            devices.append(SimulatedDevice(path: "/devices/platform/emmc2bus", properties: ["SUBSYSTEM": "platform"]))
        }
        if isPartition {
            devices.append(SimulatedDevice(
                path: diskPath, node: "mmcblk0",
                properties: ["SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": "/dev/mmcblk0", "MAJOR": "179", "MINOR": "0"],
                attributes: ["removable": "0", "size": "62333952", "dev": "179:0"]))
        }
        return (devices, path)
    }
}

@Suite("70-provision.rules on simulated block devices (umockdev + udevadm test)")
struct BlockRulesTests {
    let gid: String
    let rules: [String: String]

    init() throws {
        gid = try provisionGroupID()
        rules = try UdevRuleSimulator.projectRules()
    }

    @Test func tagsAUSBCardReaderSlotWithItsPathAndGroup() throws {
        let (devices, disk) = Storage.usbDisk(removable: true, lun: 2)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(result.diagnostics.isEmpty, "udev complained: \(result.diagnostics)")
        #expect(result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_SLOT_PATH"] == "pci-0000:00:14.0-usb-0:1.1:1.0-scsi-0:0:0:2")
        #expect(result.properties["PROVISION_SLOT_PATH"] == result.properties["ID_PATH"])
        #expect(result.group == gid)
        #expect(result.mode == "0660")
    }

    @Test func givesEachLUNOfAReaderItsOwnSlot() throws {
        let (first, firstDisk) = Storage.usbDisk(removable: true, lun: 0, kernelName: "sdb")
        let (third, thirdDisk) = Storage.usbDisk(removable: true, lun: 2, kernelName: "sdd")
        let a = try UdevRuleSimulator.simulate(first, target: firstDisk, rules: rules)
        let c = try UdevRuleSimulator.simulate(third, target: thirdDisk, rules: rules)
        #expect(a.properties["PROVISION_SLOT_PATH"] == "pci-0000:00:14.0-usb-0:1.1:1.0-scsi-0:0:0:0")
        #expect(c.properties["PROVISION_SLOT_PATH"] == "pci-0000:00:14.0-usb-0:1.1:1.0-scsi-0:0:0:2")
    }

    @Test func keepsTheTagOnAReaderEventOtherThanAdd() throws {
        // A card pushed into a reader is a `change` (DISK_MEDIA_CHANGE=1) on the same sdX.
        let (devices, disk) = Storage.usbDisk(removable: true)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, action: "change", rules: rules)
        #expect(result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_SLOT_PATH"] != nil)
    }

    @Test func leavesAUSBHardDiskAlone() throws {
        let (devices, disk) = Storage.usbDisk(removable: false)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(!result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_SLOT_PATH"] == nil)
        #expect(result.group != gid)
    }

    @Test func leavesAPartitionOfATaggedReaderAlone() throws {
        let (devices, partition) = Storage.usbDisk(removable: true, partition: 1)
        let result = try UdevRuleSimulator.simulate(devices, target: partition, rules: rules)
        #expect(result.properties["DEVTYPE"] == "partition")
        #expect(!result.currentTags.contains("provision"))
        #expect(result.properties["PROVISION_SLOT_PATH"] == nil)
        #expect(result.group != gid)
    }

    @Test(arguments: [false, true])
    func leavesASATADiskAloneEvenWhenHotpluggable(removable: Bool) throws {
        let (devices, disk) = Storage.sataDisk(removable: removable)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(!result.currentTags.contains("provision"))
        #expect(result.group != gid)
    }

    @Test func tagsAnSDCardOnAnSDHost() throws {
        let (devices, disk) = Storage.mmc(type: "SD")
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(result.diagnostics.isEmpty, "udev complained: \(result.diagnostics)")
        #expect(result.currentTags.contains("provision"))
        // No ID_PATH for a card on sdhci-pci (path_id knows no transport there): the
        // slot is named after the MMC host.
        #expect(result.properties["ID_PATH"] == nil)
        #expect(result.properties["PROVISION_SLOT_PATH"] == "mmc-host:mmc0")
        #expect(result.group == gid)
        #expect(result.mode == "0660")
    }

    @Test func usesTheIDPathOfAnSDHostBehindAPlatformDevice() throws {
        let (devices, disk) = Storage.mmc(type: "SD", behindPlatformDevice: true)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(result.currentTags.contains("provision"))
        #expect(result.properties["ID_PATH"] == "platform-fe340000.mmc")
        #expect(result.properties["PROVISION_SLOT_PATH"] == "platform-fe340000.mmc")
    }

    @Test func leavesSolderedEMMCAlone() throws {
        let (devices, disk) = Storage.mmc(type: "MMC")
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(!result.currentTags.contains("provision"))
        #expect(result.group != gid)
    }

    @Test func leavesAnEMMCBootAreaAlone() throws {
        // mmcblk0boot0 is DEVTYPE=disk: only the card type keeps it out.
        let (devices, disk) = Storage.mmc(type: "MMC", disk: "mmcblk0boot0")
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: rules)
        #expect(result.properties["DEVTYPE"] == "disk")
        #expect(!result.currentTags.contains("provision"))
    }

    @Test func leavesAPartitionOfAnSDCardAlone() throws {
        let (devices, partition) = Storage.mmc(type: "SD", disk: "mmcblk0p1")
        let result = try UdevRuleSimulator.simulate(devices, target: partition, rules: rules)
        #expect(result.properties["DEVTYPE"] == "partition")
        #expect(!result.currentTags.contains("provision"))
        #expect(result.group != gid)
    }

    @Test func importsTheSlotPathWhenPersistentStorageRulesAreSkipped() throws {
        // UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG makes 60-persistent-storage.rules skip
        // the device, so ID_PATH would be missing without our own path_id import.
        var withFlag = rules
        withFlag["10-disable-persistent-storage.rules"] =
            "SUBSYSTEM==\"block\", ENV{UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG}=\"1\"\n"
        let (devices, disk) = Storage.usbDisk(removable: true, lun: 1)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: withFlag)
        #expect(result.properties["UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG"] == "1")
        #expect(result.properties["ID_BUS"] == nil, "60-persistent-storage.rules still ran")
        #expect(result.properties["PROVISION_SLOT_PATH"] == "pci-0000:00:14.0-usb-0:1.1:1.0-scsi-0:0:0:1")
    }

    @Test func reportsRuleErrorsSoTheOtherTestsCanTrustASilentRun() throws {
        // The simulator's `diagnostics` is what the happy-path tests check is empty: show
        // that it does catch a broken rule and an unknown group.
        let broken = rules["70-provision.rules"]!.replacingOccurrences(
            of: "TAG+=\"provision\", GROUP=\"provision\"",
            with: "TAG+=\"provision\", GROUP=\"no-such-group-provision\", BOGUS=\"1\"")
        let (devices, disk) = Storage.usbDisk(removable: true)
        let result = try UdevRuleSimulator.simulate(devices, target: disk, rules: ["70-provision.rules": broken])
        #expect(result.diagnostics.contains { $0.contains("Unknown group 'no-such-group-provision'") })
        #expect(result.diagnostics.contains { $0.contains("Invalid key 'BOGUS'") })
    }
}
