"""Episode costs across parties, linked by a private intersection-sum of pseudonyms.

A hospital's episode is its stay plus what insurers and pharma companies paid for the
same patient in a window around it (Medicare Spending per Beneficiary: 3 days before
admission to 30 days after discharge). The parties share a pseudonymous patient key, but
none may see another's rows: ``windows`` turns stays and claims into set items,
``intersection_sum`` sums a payer's costs over the items it shares with a hospital
without either side learning the other's items, and ``episodes`` runs it between every
hospital and payer and reports per hospital. Pure: no Flower, no network.
"""

from fedcost.linkage.episodes import EpisodeCosts, HospitalEpisodes, link_episodes
from fedcost.linkage.windows import Claims, EpisodeWindow, Stays

__all__ = ["Claims", "EpisodeCosts", "EpisodeWindow", "HospitalEpisodes", "Stays", "link_episodes"]
