//! The fixed offer catalogue.

/// Which product line an offer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductFamily {
    Azure,
    Office365,
}

/// Who owns a subscription of an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerType {
    /// The user who bought it (Azure).
    User,
    /// The directory itself (Office 365).
    Directory,
}

/// One offer of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub id: &'static str,
    pub display_name: &'static str,
    pub family: ProductFamily,
    pub owner: OwnerType,
    /// Per-seat offers take 1..=[`MAX_SEATS`] seats; others take 0.
    pub per_seat: bool,
    /// At most one subscription of a free-trial offer per user, ever.
    pub free_trial: bool,
}

/// The offer a free trial is upgraded to.
pub const PAY_AS_YOU_GO: &str = "azure-pay-as-you-go";

/// The most seats one subscription may have.
pub const MAX_SEATS: i32 = 1_000_000;

const fn azure(id: &'static str, display_name: &'static str, free_trial: bool) -> Offer {
    Offer {
        id,
        display_name,
        family: ProductFamily::Azure,
        owner: OwnerType::User,
        per_seat: false,
        free_trial,
    }
}

const fn office(id: &'static str, display_name: &'static str) -> Offer {
    Offer {
        id,
        display_name,
        family: ProductFamily::Office365,
        owner: OwnerType::Directory,
        per_seat: true,
        free_trial: false,
    }
}

/// Every offer, in the order ListOffers answers.
pub const CATALOGUE: [Offer; 6] = [
    azure("azure-pay-as-you-go", "Azure Pay-As-You-Go", false),
    azure("azure-free-trial", "Azure Free Trial", true),
    office("office365-business-basic", "Office 365 Business Basic"),
    office(
        "office365-business-standard",
        "Office 365 Business Standard",
    ),
    office("office365-business-premium", "Office 365 Business Premium"),
    office("office365-e3", "Office 365 E3"),
];

/// The offer with this id.
pub fn find(id: &str) -> Option<&'static Offer> {
    CATALOGUE.iter().find(|o| o.id == id)
}
